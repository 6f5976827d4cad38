"""Eval outputs in a run dir: `eval/results.json` (per task: metrics, stderr, n, config, model
identity, versions) and `eval/samples.jsonl` (one line per scored output), both written atomically;
plus the summary table."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

from losia_cli import atomic
from losia_cli.provenance import versions


def mean_stderr(values: list[float]) -> float:
    """Sample standard deviation / sqrt(n), lm-eval's `mean_stderr` (nan for n < 2)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def model_identity(model, name_or_path: str | None = None) -> dict:
    config = getattr(model, "config", None)
    return {
        "name_or_path": name_or_path or getattr(config, "_name_or_path", None),
        "model_type": getattr(config, "model_type", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def _json_safe(value):
    """NaN is not JSON: write it as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(out_dir: str | Path, task_results: dict[str, dict], *, model: dict | None = None,
                  config: dict | None = None) -> Path:
    """Write `<out_dir>/results.json` and `<out_dir>/samples.jsonl` (out_dir is normally
    `runs/<name>/eval`). `task_results` maps task name -> an `evaluate()` result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model or {},
        "config": config or {},
        "versions": versions(),
        "tasks": {name: {k: v for k, v in r.items() if k != "samples"} for name, r in task_results.items()},
    }
    atomic.write_json(out / "results.json", _json_safe(summary))
    lines = [json.dumps(_json_safe({"task": name, **s}), default=str)
             for name, r in task_results.items() for s in r.get("samples", [])]
    atomic.write_text(out / "samples.jsonl", "".join(line + "\n" for line in lines))
    return out / "results.json"


def results_table(task_results: dict[str, dict]):
    """A rich Table: task, metric, value, stderr, n."""
    from rich.table import Table

    with_baseline = any("baseline_metrics" in r for r in task_results.values())
    table = Table(title="evaluation")
    columns = ["task", "metric", "value", "± stderr", "n"] + (["baseline", "Δ"] if with_baseline else [])
    for column in columns:
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for name, r in task_results.items():
        for metric, value in r["metrics"].items():
            err = r.get("stderr", {}).get(metric)
            err_text = "" if err is None or not math.isfinite(err) else f"{err:.4f}"
            row = [name, metric, f"{value:.4f}", err_text, str(r.get("n", ""))]
            if with_baseline:
                base = r.get("baseline_metrics", {}).get(metric)
                row += ["", ""] if base is None else [f"{base:.4f}", f"{value - base:+.4f}"]
            table.add_row(*row)
    return table
