"""Atomic writes: a crash never leaves a half-written file or directory that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator


def temp_path_for(final: Path) -> Path:
    """Where `file(final)` / `directory(final)` builds its content (other processes may write into it too)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp")


@contextlib.contextmanager
def file(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path` to write to; it replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    with file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def directory(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `final`; rename it into place only if the block succeeds."""
    final = Path(final)
    tmp = temp_path_for(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
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
