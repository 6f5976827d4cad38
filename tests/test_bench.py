"""`losia bench` on a micro shape: the report has every field and ratio (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from losia_cli.bench import run_bench, timing_table
from losia_cli.errors import BenchError
from losia_cli.cli import build_parser
from losia_cli.errors import UsageError

MICRO = dict(family="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


def _has_losia() -> bool:
    try:
        from losia_cli.methods.losia import LosiaConfig, LosiaMethod  # noqa: F401
    except ImportError:
        return False
    return True


FIELDS = ("median_step_s", "p95_step_s", "mean_step_s", "tokens_per_s", "trainable_params", "total_params",
          "optimizer_state_bytes", "param_bytes", "grad_bytes", "activation_bytes", "accounted_bytes",
          "peak_memory_bytes", "step_time_vs_floor", "step_time_vs_lora", "memory_vs_lora")


def test_run_bench_micro_fields_and_ratios():
    methods = ["floor", "full", "lora"] + (["losia_pro", "losia_pro_delta"] if _has_losia() else [])
    report = run_bench(MICRO, methods, batch=2, seq=16, steps=2, warmup=1, rss=False)
    meta, results = report["meta"], report["results"]
    assert {"date", "command", "device", "versions"} <= set(meta) and meta["versions"]["torch"]
    assert meta["peak_memory_metric"] == "accounted_bytes"
    assert list(results) == methods
    for name, r in results.items():
        assert all(key in r for key in FIELDS), (name, set(FIELDS) - set(r))
        assert len(r["step_times_s"]) == 2 and r["p95_step_s"] >= r["median_step_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["median_step_s"])
        assert r["step_time_vs_lora"] == pytest.approx(r["median_step_s"] / results["lora"]["median_step_s"])
    floor, full, lora = results["floor"], results["full"], results["lora"]
    assert floor["step_time_vs_floor"] == lora["step_time_vs_lora"] == 1.0
    assert floor["trainable_params"] == 0 and floor["grad_bytes"] == 0 and floor["optimizer_state_bytes"] == 0
    assert floor["activation_bytes"] > 0  # backward runs through the layers
    assert full["trainable_params"] == full["total_params"]
    # AdamW holds two fp32 moments per trainable parameter (+ the step counters).
    assert 2 * 4 * full["trainable_params"] <= full["optimizer_state_bytes"] < 2 * 4 * full["trainable_params"] + 4096
    assert full["grad_bytes"] == 4 * full["trainable_params"]
    assert 0 < lora["trainable_params"] < full["trainable_params"]
    for name, r in results.items():  # time per part of the step
        parts = r["part_times_s"]
        assert parts["forward"] > 0 and parts["backward"] > 0, name
        assert (parts["optimizer"] > 0) == (name != "floor"), name
        assert (parts.get("write_through", 0) > 0) == (name == "losia_pro"), name  # delta: no W written per step
    assert "| method | forward | backward | optimizer |" in timing_table(report)
    if "losia_pro" in results:  # parameter parity with LoRA at the same rank (docs/method.md 3.2)
        assert results["losia_pro"]["trainable_params"] == pytest.approx(lora["trainable_params"], rel=0.2)
        # The delta form trains the same blocks; only when W is written differs.
        assert results["losia_pro_delta"]["trainable_params"] == results["losia_pro"]["trainable_params"]


def test_run_bench_sequential_mode_and_bad_input():
    report = run_bench(MICRO, ["floor", "lora"], batch=1, seq=8, steps=1, warmup=1, rss=False, interleave=False)
    assert report["results"]["lora"]["step_time_vs_floor"] > 0
    with pytest.raises(BenchError, match="unknown method"):
        run_bench(MICRO, ["floor", "qlora"], steps=1, warmup=1, rss=False)
    with pytest.raises(BenchError, match="unknown model"):
        run_bench("llama_h3_l1", ["floor"], steps=1, warmup=1, rss=False)


def _bench(*words) -> int:
    """`losia bench WORDS` as the CLI parses it, raising instead of printing errors."""
    args = build_parser().parse_args(["bench", *words])
    return args.run(args)


@pytest.mark.parametrize("word, message", [
    ("bogus=1", "unknown option 'bogus'"),
    ("batch=0", "batch: must be > 0 (got 0)"),
    ("batch=x", "batch: expected int (got 'x')"),
    ("batch=1.5", "batch: expected int (got 1.5)"),
    ("device=gpu", "device: expected one of auto, cpu, cuda, meta (got 'gpu')"),
    ("dtype=fp8", "dtype: 'fp8' is not a"),
    ("rss=maybe", "rss: expected bool"),
    ("methods=[lora,true]", "methods: expected str (got True)"),
    ("seq", "expected key=value, got 'seq'"),
    ("seq=[1", "seq: cannot read the value"),
])
def test_bench_options_are_checked(word, message):
    with pytest.raises(UsageError) as e:
        _bench(word)
    assert str(e.value).startswith(message)


def test_bench_options_read_as_the_recipe_grammar():
    from losia_cli.commands.bench import BenchOptions
    from losia_cli.compose import parse_options

    opts = parse_options(["methods=floor,lora", "rank_factor=1e-1", "dtype=null", "note='a b'", "model=7",
                          "interleave=false"], BenchOptions)
    assert (opts.methods, opts.rank_factor, opts.dtype, opts.note, opts.model, opts.interleave) == (
        ["floor", "lora"], 0.1, None, "a b", "7", False)
    assert parse_options(["methods=lora"], BenchOptions).methods == ["lora"]  # one value: a list of one
    assert parse_options(["methods=[lora, dora]"], BenchOptions).methods == ["lora", "dora"]


def test_bench_command_writes_json(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in MICRO.items() if k != "family"}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(tmp_path / "micro")
    out, png = tmp_path / "bench.json", tmp_path / "plots" / "bench.png"
    assert _bench(
        f"model={tmp_path / 'micro'}", "methods=[floor,lora]", "batch=1", "seq=8", "steps=1", "warmup=1",
        "lora_rank=4", "device=cpu", "--no-rss", "--out", str(out), "--plot", str(png), "--note", "quiet box",
    ) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"floor", "lora"} and report["meta"]["config"]["lora_rank"] == 4
    assert report["meta"]["notes"] == "quiet box"
    assert "lora" in capsys.readouterr().out
    two_methods = _png_shape(png)

    # Re-plot a saved result without running anything: three methods make a taller chart.
    report["results"]["losia_pro"] = dict(report["results"]["lora"], step_time_vs_lora=0.5, memory_vs_lora=0.8)
    out.write_text(json.dumps(report))
    assert _bench("--from", str(out)) == 0
    three_methods = _png_shape(out.with_suffix(".png"))  # default: next to the JSON
    assert three_methods[1] == two_methods[1] and three_methods[0] > two_methods[0]
    assert "losia_pro" in capsys.readouterr().out  # the table is printed again too


def _png_shape(path) -> tuple[int, int]:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.std() > 0  # something was drawn
    return image.shape[:2]


def test_bench_from_json_errors(tmp_path):
    with pytest.raises(BenchError, match="no such file"):
        _bench("--from", str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text('{"methods": []}')
    with pytest.raises(BenchError, match="not a `losia bench` result"):
        _bench("--from", str(tmp_path / "other.json"))


@pytest.mark.skipif(importlib.util.find_spec("galore_torch") is None, reason="galore-torch not installed")
def test_run_bench_galore():
    r = run_bench(MICRO, ["lora", "galore"], batch=1, seq=8, steps=1, warmup=1, rss=False)["results"]["galore"]
    assert r["trainable_params"] == r["total_params"] and r["optimizer_state_bytes"] > 0


def _bare_site(dest, roots: tuple[str, ...], left_out: set[str]):
    """A site dir of links to the installed distributions `roots` need (their install requirements,
    transitively), without the `left_out` ones: what a bare GPU image with only those packages has."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = {}, list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or name in left_out:
            continue
        try:
            seen[name] = dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        reqs = (Requirement(r) for r in dist.requires or [])
        todo += [r.name for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
    dest.mkdir()
    for dist in seen.values():
        for top in {str(f).split("/")[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if (dist.locate_file(top)).exists() and not (dest / top).exists():
                (dest / top).symlink_to(dist.locate_file(top))
    return sorted(seen)


def test_bench_runs_with_only_torch_transformers_and_peft(tmp_path):
    """`losia bench` on a bare GPU image: only torch, transformers, peft and what they install themselves
    (accelerate comes with peft). Not there: pydantic and rich (transformers' CLI pulls them in through
    typer; the GPU image has neither), hydra/omegaconf, datasets, matplotlib. One meta count and one timed
    CPU step, in an interpreter that sees nothing else (`-S`: no site-packages)."""
    import subprocess
    import sys
    from pathlib import Path

    site = tmp_path / "site"
    have = _bare_site(site, ("torch", "transformers", "peft"), {"pydantic", "pydantic-core", "rich", "typer"})
    assert {"torch", "transformers", "peft", "accelerate"} <= set(have)
    assert not {"hydra-core", "omegaconf", "datasets", "matplotlib", "pydantic", "rich"} & set(have)
    repo = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{site}:{repo}", "HF_HUB_OFFLINE": "1"}
    for extra in (["device=meta"], ["device=cpu", "steps=1", "warmup=1", "rss=false", "batch=1", "seq=8"]):
        out = subprocess.run(
            [sys.executable, "-S", "-m", "losia_cli.cli", "bench", "model=llama_h512_l4",
             "methods=[floor,lora,losia_pro]", *extra, "--out", str(tmp_path / "r.json")],
            capture_output=True, text=True, env=env, cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert "| losia_pro |" in out.stdout



def test_mfu_is_six_n_per_token_over_the_gpus_peak(monkeypatch):
    """MFU (the issue's GPU target reports it): 6 x params x tokens/s over the bf16 peak of the named GPU;
    none on a CPU or an unknown GPU. The bench table shows it."""
    from types import SimpleNamespace

    from losia_cli.bench import timing_table
    from losia_cli.engine.records import model_flops_utilisation

    cuda = SimpleNamespace(type="cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    assert model_flops_utilisation(cuda, 7e9, 2000.0, world=1) == pytest.approx(6 * 7e9 * 2000 / 989e12)
    assert model_flops_utilisation(cuda, 7e9, 2000.0, world=2) == pytest.approx(6 * 7e9 * 1000 / 989e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some GPU")
    assert model_flops_utilisation(cuda, 7e9, 2000.0, world=1) is None
    assert model_flops_utilisation(torch.device("cpu"), 7e9, 2000.0, world=1) is None
    report = run_bench(MICRO, ["floor", "lora"], batch=1, seq=8, steps=1, warmup=1, rss=False)
    assert report["results"]["lora"]["mfu"] is None  # CPU
    report["results"]["lora"]["mfu"] = 0.4215
    assert "| 42.1% |" in timing_table(report) or "| 42.2% |" in timing_table(report)
