"""`losia report`: figures and the self-contained HTML page, from synthetic run dirs (fast) and from
one real tiny training run (slow)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from losia_cli.cli import main
from losia_cli.errors import ReportError
from losia_cli.report import build_report
from losia_cli.report.figures import occupancy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODULES = ["self_attn.q_proj", "mlp.down_proj"]
SHAPE = {"self_attn.q_proj": [16, 16], "mlp.down_proj": [16, 40]}


def write_run(root: Path, name: str, method: str = "losia_pro", steps: int = 12, layers: int = 3,
              period: int = 4, crashed: bool = False, grad_norm: bool = False) -> tuple[Path, dict]:
    """A run dir as the engine writes it: config.yaml, metrics.jsonl, subnets.jsonl, report.json."""
    run = root / name
    run.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    config = {"recipe": "smollm2_135m_math", "model": {"name_or_path": "package:smollm2-135m"},
              "method": {"name": method}, "device": "x86_64 CPU, 2 threads", "seed": 7,
              "versions": {"torch": "2.13.0", "losia_cli": "0.1.0", "git_sha": "0123456789abcdef"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = [{"step": s, "loss": 2.0 / s, "lr": 1e-3 * s / steps, "lr_groups": [1e-3 * s / steps, 5e-4],
                "tokens": 512, "step_time_s": 0.5 + 0.01 * s, "tokens_per_s": 512 / (0.5 + 0.01 * s),
                "peak_mem_bytes": 300 * 2**20 + s * 2**20} for s in range(1, steps + 1)]
    if grad_norm:  # logged when clipping is on (older runs have no such key)
        for m in metrics:
            m["grad_norm"] = 3.0 / m["step"] ** 0.5
    lines = [json.dumps(m) for m in metrics]
    subnets = []
    if method.startswith("losia"):
        for step in range(0, steps, period):
            for layer in range(layers):
                for kind in MODULES:
                    m, n = SHAPE[kind]
                    subnets.append({
                        "step": step, "layer": layer, "module": f"model.layers.{layer}.{kind}.weight",
                        "shape": [m, n], "rows": sorted(rng.choice(m, 4, replace=False).tolist()),
                        "cols": sorted(rng.choice(n, 4, replace=False).tolist()), "score_mass": 0.3,
                        "overlap_prev": float(rng.random()) if step else 0.0,
                        "source": "score" if step else "random"})
    sub_lines = [json.dumps(s) for s in subnets]
    if crashed:  # the engine's line buffering can leave half of the last record on disk
        lines[-1] = lines[-1][: len(lines[-1]) // 2]
        if sub_lines:
            sub_lines[-1] = sub_lines[-1][:20]
    (run / "metrics.jsonl").write_text("\n".join(lines) + ("" if crashed else "\n"))
    (run / "subnets.jsonl").write_text("".join(line + "\n" for line in sub_lines))
    report = {"method": method, "trainable_params": 123_456, "total_params": 1_000_000,
              "optimizer_state_bytes": 72 * 2**20, "step_time_s": {"p50": 0.5432, "p95": 0.6789},
              "tokens_per_s": 941.3, "peak_mem_bytes": 321 * 2**20, "relocalization_time_s": 1.25,
              "first_loss": 2.0, "final_loss": metrics[-1]["loss"], "wall_s": 61.5, "total_steps": steps}
    if not crashed:
        (run / "report.json").write_text(json.dumps(report))
    return run, report


def pngs_in(html: str) -> list[bytes]:
    return [base64.b64decode(d) for d in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def assert_pngs(out: Path, names: set[str]) -> str:
    """Every expected PNG exists, is a real PNG of non-trivial size, and is inlined in the page."""
    html = (out / "report.html").read_text()
    assert {p.name for p in out.glob("*.png")} == names
    inlined = pngs_in(html)
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
        assert data in inlined, f"{name} is not embedded in report.html"
    assert len(inlined) == len(names)
    # Self-contained: nothing that a browser would fetch.
    assert not re.search(r'(src|href)="(?!data:)', html) and "<script" not in html
    return html


def test_single_losia_run(tmp_path):
    run, report = write_run(tmp_path, "demo", grad_norm=True)
    page = build_report([run])
    assert page == run / "report" / "report.html"
    html = assert_pngs(run / "report", {"loss.png", "lr.png", "step_time.png", "memory.png", "churn.png",
                                        "grad_norm.png", "subnet_self_attn_q_proj.png",
                                        "subnet_mlp_down_proj.png"})
    for value in ("123,456", "12.35%", "72.0 MiB", "0.543", "0.679", "941.3",
                  "321.0 MiB", "1.25", f"{report['final_loss']:.4f}", "1.0 min", "package:smollm2-135m",
                  "x86_64 CPU, 2 threads", "torch 2.13.0", "0123456789ab", "losia_pro"):
        assert value in html, value
    # Reporting again replaces the previous report, but never a file someone added to it.
    build_report([run])
    (run / "report" / "mine.png").write_bytes(b"x")
    with pytest.raises(ReportError, match="holds files losia did not write there"):
        build_report([run])
    assert (run / "report" / "mine.png").exists()


def test_occupancy_weights_blocks_by_how_long_they_trained():
    def rec(step, rows, cols):
        return {"step": step, "layer": 2, "module": "model.layers.2.mlp.up_proj.weight", "shape": [4, 3],
                "rows": rows, "cols": cols}

    # Rows {0,1} train steps 0..3, rows {1,2} steps 3..4 (the run ends at step 4).
    occ = occupancy([rec(0, [0, 1], [0]), rec(3, [1, 2], [2])], end_step=4)
    rows, cols = occ["mlp.up_proj"][2]
    np.testing.assert_allclose(rows, [0.75, 1.0, 0.25, 0.0])
    np.testing.assert_allclose(cols, [0.75, 0.0, 0.25])


def test_occupancy_keeps_each_experts_matrix_apart():
    """Records of a 3-D expert parameter carry the expert: expert 1's block at step 0 is not the
    predecessor of expert 0's at step 0."""
    def rec(expert, rows):
        return {"step": 0, "layer": 0, "module": "model.layers.0.mlp.experts.down_proj", "expert": expert,
                "shape": [2, 2], "rows": rows, "cols": [0]}

    occ = occupancy([rec(0, [0]), rec(1, [1])], end_step=4)
    np.testing.assert_allclose(occ["mlp.experts.down_proj.0"][0][0], [1.0, 0.0])
    np.testing.assert_allclose(occ["mlp.experts.down_proj.1"][0][0], [0.0, 1.0])


def test_non_losia_run_skips_subnet_figures(tmp_path):
    run, _ = write_run(tmp_path, "lora-run", method="lora")
    build_report([run])
    html = assert_pngs(run / "report", {"loss.png", "lr.png", "step_time.png", "memory.png"})
    assert "subnet figures skipped" in html and "lora" in html


def test_crashed_run_reports_from_the_jsonl_files(tmp_path):
    run, _ = write_run(tmp_path, "crashed", crashed=True, steps=12)
    out = tmp_path / "crash-report"
    assert main(["report", str(run), "--out", str(out)]) == 0
    html = assert_pngs(out, {"loss.png", "lr.png", "step_time.png", "memory.png", "churn.png",
                             "subnet_self_attn_q_proj.png", "subnet_mlp_down_proj.png"})
    assert "no report.json" in html and "truncated last line" in html
    # Summary recomputed from the 11 intact steps: last loss and peak memory of step 11.
    assert f"{2.0 / 11:.4f}" in html and f"{(300 + 11):.1f} MiB" in html


def test_two_runs_overlay(tmp_path):
    a, _ = write_run(tmp_path, "a-losia", steps=12)
    b, _ = write_run(tmp_path, "b-lora", method="lora", steps=8)
    out = tmp_path / "cmp"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    html = assert_pngs(out, {"loss.png", "step_time.png", "memory.png"})
    rows = re.findall(r"<tr><td>(a-losia \(losia_pro\)|b-lora \(lora\))</td>", html)
    assert rows.count("a-losia (losia_pro)") == 2 and rows.count("b-lora (lora)") == 2  # summary + config


def test_continual_matrix(tmp_path):
    parent = tmp_path / "cont"
    stage_dirs = [write_run(parent, f"stage-{i}-{n}", steps=4)[0] for i, n in enumerate(["math", "code"], 1)]
    continual = {
        "method": "losia_pro",
        "stages": [{"name": "math", "run_dir": str(stage_dirs[0]), "tasks": ["gsm8k"]},
                   {"name": "code", "run_dir": "stage-2-code", "tasks": ["gsm8k", "mbpp"]}],
        "tasks": ["gsm8k", "mbpp"], "metrics": {"gsm8k": "accuracy", "mbpp": "pass@1"},
        "initial": [0.125, 0.25], "matrix": [[0.5, None], [0.375, 0.625]],
        "backward_transfer": -0.125, "forgetting": 0.125, "per_task_forgetting": {"gsm8k": 0.125},
    }
    (parent / "continual.json").write_text(json.dumps(continual))
    assert main(["report", str(parent)]) == 0
    out = parent / "report"
    html = assert_pngs(out, {"continual.png", "loss.png", "step_time.png", "memory.png"})
    for text in ("-0.1250", "0.1250", "after 2: code", "mbpp (pass@1)", "0.625", "forgetting: gsm8k",
                 "math (losia_pro)", "code (losia_pro)"):  # both stage runs found (absolute, relative)
        assert text in html, text


def test_bad_paths_are_one_line_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope is not a losia run dir (no metrics.jsonl)" in err and len(err.strip().splitlines()) == 1
    run, _ = write_run(tmp_path, "ok")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data.txt").write_text("keep me")
    assert main(["report", str(run), "--out", str(tmp_path / "precious")]) == 2
    assert "holds files losia did not write there (data.txt)" in capsys.readouterr().err
    assert (tmp_path / "precious" / "data.txt").read_text() == "keep me"


def test_html_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    run, _ = write_run(tmp_path, "browse")
    page = build_report([run])
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", "--window-size=1280,2000", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 20_000
    bad = [line for line in proc.stderr.splitlines()
           if "CONSOLE" in line or "Uncaught" in line or ("report.html" in line and "ERR" in line)
           or "net::ERR_FILE_NOT_FOUND" in line]
    assert not bad, bad


@pytest.mark.slow
def test_report_on_a_real_tiny_losia_pro_run(tiny_config):
    from losia_cli.workflow import train

    run = train(tiny_config("real", "method=losia_pro", "method.period=2", "train.max_steps=6",
                            "train.save_every=3"))
    assert main(["report", str(run)]) == 0
    out = run / "report"
    report = json.loads((run / "report.json").read_text())
    kinds = {re.sub(r"^.*?layers\.\d+\.", "", json.loads(line)["module"]).removesuffix(".weight")
             for line in (run / "subnets.jsonl").read_text().splitlines()}
    expected = {"loss.png", "lr.png", "step_time.png", "memory.png", "churn.png", "grad_norm.png"}
    expected |= {"subnet_" + re.sub(r"[^A-Za-z0-9]+", "_", k) + ".png" for k in kinds}
    html = assert_pngs(out, expected)
    assert f"{report['final_loss']:.4f}" in html and f"{report['trainable_params']:,}" in html


def test_report_shows_validation_eval_data_and_folds_subnet_figures(tmp_path):
    run, _ = write_run(tmp_path, "valrun")
    with (run / "metrics.jsonl").open("a") as f:  # the engine's validation rows carry only val_loss
        f.writelines(json.dumps({"step": s, "val_loss": v}) + "\n" for s, v in ((6, 1.5), (12, 1.25)))
    report = json.loads((run / "report.json").read_text())
    report["data"] = {"n_rows": 64, "n_samples": 60, "n_tokens": 7194, "mixture": [["bundled:a", 45], ["bundled:b", 15]]}
    report["wall_s"] = 5400.0
    (run / "report.json").write_text(json.dumps(report))
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps(
        {"tasks": {"gsm8k": {"metrics": {"exact_match": 0.125}, "stderr": {"exact_match": 0.05}, "n": 8}}}))
    html = (build_report([run])).read_text()
    assert "<td>1.2500</td>" in html  # best validation loss in the summary
    assert "<td>1.50 h</td>" in html  # wall time in hours
    assert "<h2>Evaluation: valrun" in html and "<td>exact_match</td><td>0.1250</td><td>0.0500</td><td>8</td>" in html
    assert "<td>mixture: bundled:b</td><td>15</td>" in html and "<td>tokens</td><td>7,194</td>" in html
    details = html.index("<details>")
    assert html.index("loss.png") < html.index("memory.png") < details < html.index("subnet_self_attn_q_proj.png")
    assert html.index("churn.png") > details
