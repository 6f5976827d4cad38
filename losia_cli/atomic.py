"""Atomic, durable writes: a crash never leaves a half-written file or directory that looks complete.

Each writer builds its content under a temp name beside the target, fsyncs it, renames it into
place and fsyncs the parent directory, so after a power loss the target is the old or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from losia_cli.errors import UsageError


def temp_path_for(final: Path, private: bool = False) -> Path:
    """Where `file(final)` / `directory(final)` builds its content (other processes may write into it
    too); `private` gives this writer a name of its own."""
    final = Path(final)
    tag = f".{os.getpid()}-{uuid.uuid4().hex[:8]}" if private else ""
    return final.with_name(f".{final.name}{tag}.tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """This process's umask, read without changing it where /proc tells it (setting and restoring it
    would, for that moment, give another thread's new files the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(root: Path) -> None:
    """Give every file under `root` (or `root` itself) the mode a plain open() would: 0666 less the
    umask. One policy for all files losia writes: safetensors, for one, creates its files 0600."""
    mode = 0o666 & ~umask()
    files = [root] if root.is_file() else [Path(d) / name for d, _, names in os.walk(root) for name in names]
    for path in files:
        if not path.is_symlink() and path.is_file() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then the directories, deepest first."""
    for dirpath, _, filenames in sorted(os.walk(root), key=lambda entry: -entry[0].count(os.sep)):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


@contextlib.contextmanager
def file(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path` to write to; it replaces `path` only if the block succeeds.
    Only a regular file is replaced: renaming onto `--out /dev/null` would swap the device for a file."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and (path.is_symlink() or not path.is_file()):
        raise UsageError(f"{path}: not a regular file; give the path of a file to write")
    tmp = temp_path_for(path)
    try:
        yield tmp
        _honour_umask(tmp)
        _fsync(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync(path.parent)


def write_text(path: Path, text: str) -> None:
    with file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# What marks a dir as a run dir losia wrote (a run, or a continual run's parent).
RUN_FILES = ("config.yaml", "metrics.jsonl", "continual.json")
# The list of files an output dir (merge --out, report --out) was written with: replacing it may only
# delete those, never a run dir or files someone put there since.
WRITTEN = ".losia-written"


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()} - {WRITTEN}


def foreign(out: Path) -> str | None:
    """Why replacing `out` would lose something (the working directory or a dir above it, a link, a
    file, a run dir, files it was not written with), or None."""
    out = Path(out)
    if Path.cwd().resolve().is_relative_to(out.resolve()):  # `.`, `..`, `/`: checked before any listing
        return f"{out} holds the working directory"
    if out.is_symlink():
        return f"{out} is a symbolic link"
    if not out.exists():
        return None
    if not out.is_dir():
        return f"{out} is a file"
    if any((out / name).exists() for name in RUN_FILES):
        return f"{out} is a run dir"
    written = set((out / WRITTEN).read_text().splitlines()) if (out / WRITTEN).is_file() else set()
    others = sorted(_files_under(out) - written)
    if not others:
        return None
    return f"{out} holds files losia did not write there ({others[0]}{', ...' if len(others) > 1 else ''})"


@contextlib.contextmanager
def directory(final: Path, *, overwrite: bool = False, shared: bool = False, listed: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `final`; rename it into place only if the block succeeds.

    `shared`: several processes may build the same `final` at once (a cache entry); each builds its
    own copy and the first to finish wins, the others' copies are dropped. `listed`: record the files
    in WRITTEN, so that `foreign()` allows replacing them later."""
    final = Path(final)
    tmp = temp_path_for(final, private=shared)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if listed:
            (tmp / WRITTEN).write_text("".join(f"{name}\n" for name in sorted(_files_under(tmp))))
        _honour_umask(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if shared:
        try:
            os.replace(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():  # not another writer's finished copy
                raise
    elif final.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{final} already exists")
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)
