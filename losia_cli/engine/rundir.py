"""Run-dir policy, in one place: how runs are named and when a run dir may be used, resumed or replaced.

    runs/<recipe>-<method>-<YYYYmmdd-HHMMSS>/     the default name (`run.name` wins)

An existing, non-empty run dir is never reused by accident: `run.resume=auto` continues it,
`run.overwrite=true` starts it over, anything else is refused before a model loads. The dir is created
(and, for overwrite, emptied) only after config, data and model have been checked, under a lock
that one writer holds for the run's life.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

from losia_cli.atomic import RUN_FILES
from losia_cli.config import RunConfig
from losia_cli.engine import checkpoint
from losia_cli.errors import ConfigError, RunFileError
from losia_cli.provenance import timestamp


def default_run_name(cfg: RunConfig, stamp: str | None = None) -> str:
    return f"{cfg.recipe or 'run'}-{cfg.method.name}-{stamp or timestamp()}"


def name_run(cfg: RunConfig) -> RunConfig:
    """Fill in run.name (before any process launch, so every rank writes to the same dir)."""
    if cfg.run.name:
        return cfg
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": default_run_name(cfg)})})


LOCK = ".lock"


def _contents(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name != LOCK] if run_dir.is_dir() else []


def check_fresh(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start over in `run_dir` when it holds anything and `overwrite` is off, or when it is not
    a run dir (or holds the working directory) that `overwrite` may delete. Deletes nothing."""
    if not _contents(run_dir):
        return
    if not overwrite:
        raise ConfigError(
            f"run dir {run_dir} already exists; pass run.resume=auto to continue it "
            "or run.overwrite=true to start over"
        )
    if not any((run_dir / name).is_file() for name in RUN_FILES):  # only a run dir is ever cleared
        raise ConfigError(f"run.overwrite: {run_dir} is not a run dir (no {' or '.join(RUN_FILES)}); "
                          "not deleting it, choose another run.name")
    if Path.cwd().resolve().is_relative_to(run_dir.resolve()):
        raise ConfigError(f"run.overwrite: {run_dir} holds the working directory; not deleting it")


def clear(run_dir: Path, overwrite: bool) -> None:
    """Empty `run_dir` for a fresh start (after check_fresh); the lock file stays, it is held."""
    check_fresh(run_dir, overwrite)
    for path in _contents(run_dir):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def check(cfg: RunConfig) -> None:
    """The run dir's refusals, before a model loads: a finished run to resume, a resume path that is
    not a checkpoint, a dir that may not be started over. Writes nothing."""
    run_dir = cfg.run_dir()
    if cfg.run.resume:
        # A resumed run rewrites these in place: one that is a link or not a regular file is refused
        # now, before a record is truncated (replacing it would swap a device or a link for a file).
        for name in ("config.yaml", "metrics.jsonl", "subnets.jsonl"):
            path = run_dir / name
            if path.is_symlink() or (path.exists() and not path.is_file()):
                raise ConfigError(f"run.resume: {path} is not a regular file; a resumed run rewrites it")
    if cfg.run.resume == "auto":
        if (run_dir / "report.json").is_file():
            raise ConfigError(f"run.resume=auto: {run_dir} has finished already (it has report.json)")
    elif cfg.run.resume:
        path = Path(cfg.run.resume)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"run.resume: {path} is not a complete checkpoint dir")
        if reason := checkpoint.damage(path):
            raise ConfigError(f"run.resume: {path} is damaged ({reason})")
    else:
        check_fresh(run_dir, cfg.run.overwrite)


def claim(cfg: RunConfig, warn) -> tuple[RunLock, Path | None]:
    """Once setup has validated config, data and model: lock the run dir (creating it), clear it for a
    fresh start or pick the checkpoint to resume from (the newest intact one for run.resume=auto)."""
    lock = RunLock(cfg.run_dir())
    try:
        check(cfg)  # again, now that no other writer can change the dir
        if cfg.run.resume == "auto":
            found = checkpoint.newest_intact(cfg.run_dir(), warn)
            if found is None and _contents(cfg.run_dir()):  # an empty or new dir is a first start
                why = "no intact checkpoint" if checkpoint.checkpoints(cfg.run_dir()) else "no checkpoints/step-N"
                warn(f"run.resume=auto: nothing to resume in {cfg.run_dir()} ({why}); starting over from step 1")
            return lock, found
        if cfg.run.resume:
            return lock, Path(cfg.run.resume)
        clear(cfg.run_dir(), cfg.run.overwrite)
        return lock, None
    except BaseException:
        lock.release()
        raise


class RunLock:
    """An exclusive lock on a run dir for the run's life: a second writer (the same run.name, a second
    run.resume=auto) is refused with the holder's pid and host. The OS drops it when the holder dies."""

    def __init__(self, run_dir: Path):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"run dir {run_dir}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise ConfigError(f"run dir {run_dir} is in use by {holder}; wait for it or choose another run.name") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def continual_start(cfg: RunConfig, fresh: dict) -> dict:
    """The continual.json to continue from (run.resume=auto), or `fresh` in a clean parent dir."""
    root = cfg.run_dir()
    path = root / "continual.json"
    if cfg.run.resume == "auto" and (doc := read_json(path, optional=True)) is not None:
        if any(doc.get(key) != fresh[key] for key in ("method", "stages", "task_specs", "eval")):
            raise ConfigError(f"{path} is from a run with other stages, tasks, method or eval settings; "
                              "pass run.overwrite=true to start over")
        return doc
    if cfg.run.resume != "auto":
        clear(root, cfg.run.overwrite)
    return fresh


# --- reading a run dir: every command that opens one (merge, eval, export, chat, report) reads through
# these, so a file that a crash, a disk or a hand has damaged is one line naming it, never a traceback.
def read_text(path: Path, optional: bool = False) -> str | None:
    """The UTF-8 text of the run file `path`; None for a missing one when `optional`."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise RunFileError(f"{path}: a symbolic link to nothing")
        if optional:
            return None
        raise RunFileError(f"{path}: missing")
    if not path.is_file():  # a directory, a FIFO (reading it would hang), a device
        raise RunFileError(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunFileError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RunFileError(f"{path}: not UTF-8 text (line {line})") from None


def _read_mapping(path: Path, optional: bool, kind: str, parse, errors) -> dict | None:
    text = read_text(path, optional)
    if text is None:
        return None
    if not text.strip():
        raise RunFileError(f"{path}: empty")
    try:
        doc = parse(text)
    except RecursionError:
        raise RunFileError(f"{path}: not valid {kind} (nested too deeply)") from None
    except errors as e:
        mark = getattr(e, "problem_mark", None)  # yaml's, 0-based; json's errors carry lineno
        line = mark.line + 1 if mark else getattr(e, "lineno", None)
        raise RunFileError(f"{path}: not valid {kind}" + (f" (line {line})" if line else "")) from None
    if not isinstance(doc, dict):
        raise RunFileError(f"{path}: not a {kind} mapping ({type(doc).__name__})")
    return doc


def read_yaml(path: Path, optional: bool = False) -> dict | None:
    """The mapping in the YAML run file `path` (config.yaml); None for a missing one when `optional`."""
    import yaml

    return _read_mapping(path, optional, "YAML", yaml.safe_load, yaml.YAMLError)


def read_json(path: Path, optional: bool = False) -> dict | None:
    """The object in the JSON run file `path`; None for a missing one when `optional`."""
    return _read_mapping(path, optional, "JSON", json.loads, json.JSONDecodeError)
