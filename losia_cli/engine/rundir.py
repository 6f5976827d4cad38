"""Run-dir policy, in one place: how runs are named and when a run dir may be used, resumed or replaced.

    runs/<recipe>-<method>-<YYYYmmdd-HHMMSS>/     the default name (`run.name` wins)

An existing, non-empty run dir is never reused by accident: `run.resume=auto` continues it,
`run.overwrite=true` starts it over, anything else is refused before a model loads.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

from losia_cli.config import ConfigError, RunConfig
from losia_cli.engine import checkpoint


def timestamp() -> str:
    """The local time as it appears in run and output dir names."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def default_run_name(cfg: RunConfig, stamp: str | None = None) -> str:
    return f"{cfg.recipe or 'run'}-{cfg.method.name}-{stamp or timestamp()}"


def name_run(cfg: RunConfig) -> RunConfig:
    """Fill in run.name (before any process launch, so every rank writes to the same dir)."""
    if cfg.run.name:
        return cfg
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": default_run_name(cfg)})})


def clear_or_refuse(run_dir: Path, overwrite: bool) -> None:
    """Empty `run_dir` for a fresh start when `overwrite`; refuse when it holds anything otherwise."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"run dir {run_dir} already exists; pass run.resume=auto to continue it "
                "or run.overwrite=true to start over"
            )
        shutil.rmtree(run_dir)


def resume_point(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume from, if any; refuses to clobber a run by accident."""
    run_dir = cfg.run_dir()
    if cfg.run.resume == "auto":
        if (run_dir / "report.json").is_file():
            raise ConfigError(f"run.resume=auto: {run_dir} has finished already (it has report.json)")
        return checkpoint.latest(run_dir)
    if cfg.run.resume:
        path = Path(cfg.run.resume)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"run.resume: {path} is not a complete checkpoint dir")
        return path
    clear_or_refuse(run_dir, cfg.run.overwrite)
    return None


def continual_start(cfg: RunConfig, fresh: dict) -> dict:
    """The continual.json to continue from (run.resume=auto), or `fresh` in a clean parent dir."""
    root = cfg.run_dir()
    path = root / "continual.json"
    if cfg.run.resume == "auto" and path.is_file():
        doc = json.loads(path.read_text())
        if any(doc.get(key) != fresh[key] for key in ("method", "stages", "task_specs", "eval")):
            raise ConfigError(f"{path} is from a run with other stages, tasks, method or eval settings; "
                              "pass run.overwrite=true to start over")
        return doc
    if cfg.run.resume != "auto":
        clear_or_refuse(root, cfg.run.overwrite)
    return fresh
