"""The runs a report reads, and their summary values.

Reads only the run-dir contract (docs/architecture.md, section 3): metrics.jsonl and subnets.jsonl are
enough, so a crashed run (no report.json, maybe a half-written last line) still gets a report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from losia_cli.engine.records import step_timings
from losia_cli.engine.rundir import read_json, read_yaml
from losia_cli.errors import ReportError


@dataclass
class Run:
    path: Path
    config: dict
    metrics: list[dict]
    subnets: list[dict]
    report: dict | None
    continual: dict | None
    eval: dict | None = None  # eval/results.json, when the run was evaluated
    notes: list[str] = field(default_factory=list)
    label: str = ""

    @property
    def method(self) -> str:
        return (self.report or {}).get("method") or (self.config.get("method") or {}).get("name") or (
            (self.continual or {}).get("method") or "?")


# --- reading --------------------------------------------------------------------------------------
def read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    """Records of a line-buffered JSONL file; a crash can only cut its last line, which is skipped."""
    if not path.is_file():
        return []
    lines = [(i, line) for i, line in enumerate(path.read_bytes().splitlines(), 1) if line.strip()]
    records = []
    for i, line in lines:
        try:
            record = json.loads(line.decode())  # bytes, decoded per line: a bad line is named by number
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            if i == lines[-1][0]:
                notes.append(f"{path.name}: ignored a truncated last line (the run was cut off mid-write)")
                continue
            what = "UTF-8" if isinstance(e, UnicodeDecodeError) else "valid JSON"
            raise ReportError(f"{path}:{i} is not {what}") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ReportError(f"{path}:{i} is not a record with a 'step'")
        records.append(record)
    return records


def load_run(path: Path) -> Run:
    path = Path(path)
    if not (path / "metrics.jsonl").is_file() and not (path / "continual.json").is_file():
        raise ReportError(f"{path} is not a losia run dir (no metrics.jsonl)")
    notes: list[str] = []
    config = read_yaml(path / "config.yaml", optional=True) or {}
    metrics = read_jsonl(path / "metrics.jsonl", notes)
    subnets = read_jsonl(path / "subnets.jsonl", notes)
    report = read_json(path / "report.json", optional=True)
    if not metrics and (path / "metrics.jsonl").is_file():
        notes.append("metrics.jsonl holds no complete record yet: no curves to draw")
    if report is None and metrics:
        notes.append("no report.json (the run crashed or is still running): summary computed from metrics.jsonl")
    return Run(path, config, metrics, subnets, report, read_json(path / "continual.json", optional=True),
               read_json(path / "eval" / "results.json", optional=True), notes)


def stage_runs(run: Run) -> list[Run]:
    """The stage run dirs a continual.json names, where they still exist (paths absolute or relative)."""
    found = []
    for stage in (run.continual or {}).get("stages", []):
        given = Path(stage.get("run_dir", ""))
        for candidate in (given, run.path / given, run.path / given.name):
            if (candidate / "metrics.jsonl").is_file():
                found.append(load_run(candidate))
                found[-1].label = f"{stage.get('name', candidate.name)} ({found[-1].method})"
                break
    return found


def label_runs(runs: list[Run]) -> None:
    names = [r.path.resolve().name for r in runs]
    for run, name in zip(runs, names):
        if names.count(name) > 1:  # e.g. several runs/*/stage-1: keep the parent to tell them apart
            name = f"{run.path.resolve().parent.name}/{name}"
        run.label = run.label or f"{name} ({run.method})"


# --- summary --------------------------------------------------------------------------------------
def summary(run: Run) -> dict:
    """The summary-table values: report.json where present, else recomputed as the engine does."""
    rep, m = run.report, [r for r in run.metrics if "loss" in r]  # training rows (val rows: val_loss only)
    val = [r["val_loss"] for r in run.metrics if "val_loss" in r]
    best_val = min(val) if val else None
    if rep is not None:
        times = rep.get("step_time_s") or {}
        return {
            "method": run.method, "trainable_params": rep.get("trainable_params"),
            "total_params": rep.get("total_params"), "optimizer_state_bytes": rep.get("optimizer_state_bytes"),
            "p50": times.get("p50"), "p95": times.get("p95"), "tokens_per_s": rep.get("tokens_per_s"),
            "peak_mem_bytes": rep.get("peak_mem_bytes"), "relocalization_time_s": rep.get("relocalization_time_s"),
            "first_loss": rep.get("first_loss"), "final_loss": rep.get("final_loss"), "wall_s": rep.get("wall_s"),
            "steps": rep.get("total_steps"), "best_val_loss": best_val,
        }
    timed = [r for r in m if "step_time_s" in r]
    timings = step_timings([r["step_time_s"] for r in timed], [r.get("tokens", 0) for r in timed])
    return {
        "method": run.method, "trainable_params": None, "total_params": None, "optimizer_state_bytes": None,
        "p50": timings["p50"], "p95": timings["p95"], "tokens_per_s": timings["tokens_per_s"],
        "peak_mem_bytes": max((r["peak_mem_bytes"] for r in m if "peak_mem_bytes" in r), default=None),
        "relocalization_time_s": None, "first_loss": m[0].get("loss") if m else None,
        "final_loss": m[-1].get("loss") if m else None, "wall_s": None,
        "steps": m[-1]["step"] if m else None, "best_val_loss": best_val,
    }
