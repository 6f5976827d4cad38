"""The training loop end to end on a tiny in-code Llama: run dir contract, accumulation, resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from losia_cli.errors import ConfigError
from losia_cli.engine import checkpoint
from losia_cli.engine import step as step_driver
from losia_cli.workflow import train

from test_losia_support import FP64_ATOL

METRIC_FIELDS = {"step", "loss", "lr", "tokens", "step_time_s", "tokens_per_s", "peak_mem_bytes"}
REPORT_FIELDS = {
    "method", "trainable_params", "optimizer_state_bytes", "step_time_s", "tokens_per_s",
    "peak_mem_bytes", "relocalization_time_s", "final_loss", "wall_s",
}


def final_weights(run_dir):
    return load_file(str(next((run_dir / "final").glob("*.safetensors"))))


def test_full_run_writes_the_run_dir_contract(tiny_config):
    run_dir = train(tiny_config("full", "method=full"))

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["method"]["name"] == "full" and config["versions"]["torch"] == torch.__version__
    assert "CPU" in config["device"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(METRIC_FIELDS <= m.keys() for m in metrics)
    report = json.loads((run_dir / "report.json").read_text())
    assert REPORT_FIELDS <= report.keys()
    assert report["final_loss"] == pytest.approx(metrics[-1]["loss"])
    assert report["trainable_params"] == report["total_params"]
    # final/ is a plain HF dir that loads without losia.
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert sum(p.numel() for p in reloaded.parameters()) == report["total_params"]


def test_loss_goes_down(tiny_config):
    run_dir = train(tiny_config(
        "fit", "method=full", "train.max_steps=12", "train.lr=3e-3",
    ))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["final_loss"] < report["first_loss"] - 1.0  # nats per token


def test_grad_accumulation_matches_one_big_batch(tiny_config):
    """Two micro-batches sum the same token losses as one batch, in another order: fp64 and FP64_ATOL."""
    common = ("method=full", "train.max_steps=3", "model.dtype=fp64")
    big = train(tiny_config("big", *common))
    acc = train(tiny_config("acc", *common, "train.micro_batch_size=2", "train.grad_accum=2"))
    a, b = final_weights(big), final_weights(acc)
    for key in a:
        assert a[key].dtype == torch.float64, key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=FP64_ATOL)


def test_lora_final_is_an_adapter(tiny_config):
    run_dir = train(tiny_config("lora", "method=lora", "method.rank=4"))
    assert (run_dir / "final" / "adapter_config.json").is_file()
    report = json.loads((run_dir / "report.json").read_text())
    assert 0 < report["trainable_params"] < report["total_params"] / 10


def crash_then_resume(make_config, tmp_path, monkeypatch, *common):
    """Train straight; train again, crashing in the 4th micro-batch, and resume: (straight, resumed) dirs."""
    straight = train(make_config("straight", *common))

    real_loss, calls = step_driver.token_loss_sum, {"n": 0}

    def crash_on_fourth_step(logits, labels):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return real_loss(logits, labels)

    monkeypatch.setattr(step_driver, "token_loss_sum", crash_on_fourth_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_config("resumed", *common))
    run_dir = tmp_path / "resumed"
    assert not (run_dir / "report.json").exists() and not (run_dir / "final").exists()
    monkeypatch.setattr(step_driver, "token_loss_sum", real_loss)
    return straight, train(make_config("resumed", *common, "run.resume=auto"))


@pytest.mark.parametrize("method", ["full", "lora", "losia_pro"])
def test_crash_then_resume_is_bit_exact(tiny_config, tmp_path, monkeypatch, method):
    common = (f"method={method}", "train.max_steps=5", "train.save_every=2", "train.warmup_ratio=0.2")
    straight, run_dir = crash_then_resume(tiny_config, tmp_path, monkeypatch, *common)
    a, b = final_weights(straight), final_weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (straight, run_dir)]
    assert losses[0] == losses[1]


def test_crash_mid_checkpoint_leaves_nothing_resume_would_pick(tiny_config, tmp_path, monkeypatch):
    common = ("method=losia_pro", "train.max_steps=6", "train.save_every=2", "method.period=2")
    straight = train(tiny_config("straight", *common))

    real_save, calls = checkpoint.save_weights, {"n": 0}

    def die_while_writing_the_second(model, path, state=None):
        calls["n"] += 1
        if calls["n"] == 2:
            path.write_bytes(b"the first bytes of a safetensors file")
            raise RuntimeError("simulated crash mid-checkpoint")
        real_save(model, path, state)

    monkeypatch.setattr(checkpoint, "save_weights", die_while_writing_the_second)
    with pytest.raises(RuntimeError, match="mid-checkpoint"):
        train(tiny_config("crashed", *common))
    run_dir = tmp_path / "crashed"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-2"]
    # A killed process cannot clean up: its half-written temp dir must not count either.
    half = run_dir / "checkpoints" / ".step-4.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    (half / "trainer_state.json").write_text('{"step": 4}')
    assert checkpoint.latest(run_dir) == run_dir / "checkpoints" / "step-2"

    monkeypatch.setattr(checkpoint, "save_weights", real_save)
    train(tiny_config("crashed", *common, "run.resume=auto"))
    a, b = final_weights(straight), final_weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_dir_is_not_clobbered(tiny_config):
    train(tiny_config("once", "method=full", "train.max_steps=1"))
    with pytest.raises(ConfigError, match="already exists"):
        train(tiny_config("once", "method=full", "train.max_steps=1"))


def test_losia_pro_bf16_autocast_with_activation_checkpointing(tiny_config):
    common = ("method=losia_pro", "method.period=1", "train.max_steps=3")
    run_dir = train(tiny_config(
        "bf16", *common, "train.precision=bf16", "train.activation_checkpointing=true",
    ))
    fp32_dir = train(tiny_config("fp32", *common))
    losses, fp32_losses = ([json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
                           for d in (run_dir, fp32_dir))
    assert all(math.isfinite(loss) for loss in losses)  # neither NaN nor inf
    # bf16 autocast and recomputation follow the fp32 trajectory up to bf16 rounding.
    assert losses == pytest.approx(fp32_losses, rel=1e-2)
    subnets = [json.loads(line) for line in (run_dir / "subnets.jsonl").read_text().splitlines()]
    assert {r["step"] for r in subnets} >= {0, 1, 2}  # initial blocks, then a re-localization per step


def test_multirun_sweeps_methods(tiny_llama_dir, tmp_path, capsys):
    from losia_cli.cli import main

    code = main([
        "train", "-m", "method=full,lora", f"model.name_or_path={tiny_llama_dir}", "data.max_length=64",
        "train.max_steps=1", f"run.output_dir={tmp_path}",
    ])
    assert code == 0
    reports = [json.loads(p.read_text()) for p in tmp_path.glob("*/report.json")]
    assert sorted(r["method"] for r in reports) == ["full", "lora"]


def test_compare_trains_evaluates_and_tabulates(tiny_llama_dir, tmp_path, capsys):
    from losia_cli.cli import main

    code = main([
        "compare", "methods=[losia_pro,lora]", f"model.name_or_path={tiny_llama_dir}", "data.max_length=64",
        "train.max_steps=2", f"run.output_dir={tmp_path}", "eval.tasks=[boolq@bundled:boolq_sample]",
        "eval.limit=2",
    ])
    assert code == 0
    result = json.loads(next(tmp_path.glob("compare-*/compare.json")).read_text())
    assert [row["method"] for row in result["methods"]] == ["losia_pro", "lora"]
    assert all("acc" in row["tasks"]["boolq"] for row in result["methods"])
    assert all(math.isfinite(row["forgetting_delta"]) for row in result["methods"])
    assert "comparison ->" in capsys.readouterr().out


def test_host_syncs_only_every_few_steps_and_a_stop_still_checkpoints(tiny_config, tmp_path, monkeypatch):
    """Nothing logged or saved: the loop reads the device back every SYNC_EVERY steps and on the last,
    not every step. A signal during step 2 still checkpoints, at the next sync step (4)."""
    import os
    import signal

    from losia_cli.engine import loop
    from losia_cli.engine.preemption import Preempted

    monkeypatch.setattr(loop, "SYNC_EVERY", 4)
    real_sync, synced = loop._sync, []

    def counted(run, pending, *args):
        synced.append(len(pending))
        return real_sync(run, pending, *args)

    monkeypatch.setattr(loop, "_sync", counted)
    common = ("method=losia_pro", "train.max_steps=10", "train.log_every=100")
    run_dir = train(tiny_config("quiet", *common))
    assert synced == [4, 4, 2]
    assert len(json.loads((run_dir / "report.json").read_text())["step_time_s"]) == 2  # p50, p95 over all 10

    real_loss, calls = step_driver.token_loss_sum, {"n": 0}

    def signal_in_second_step(logits, labels):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_loss(logits, labels)

    monkeypatch.setattr(step_driver, "token_loss_sum", signal_in_second_step)
    with pytest.raises(Preempted, match="preempted at step 4"):
        train(tiny_config("stopped", *common))
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == ["step-4"]


def test_peak_memory_is_per_run():
    """`losia compare` trains runs one after another in one process: each reports its own peak. In a
    fresh process, so that no memory an earlier test left resident hides the drop."""
    program = """
import torch
from losia_cli.engine.memory import peak, reset_peak
cpu = torch.device("cpu")
big = torch.ones(64 * 2**20)  # 256 MiB, touched
del big
before = peak(cpu)
reset_peak(cpu)
print(before, peak(cpu))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    assert after < before - 128 * 2**20
