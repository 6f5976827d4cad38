"""Where recipes, templates and caches live, for a source checkout and for an installed wheel."""

from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _bundled(name: str) -> Path:
    # A wheel carries the folder inside the package; a source checkout keeps it at the repo root.
    inside = _PKG / name
    return inside if inside.is_dir() else _PKG.parent / name


def recipes_dir() -> Path:
    return _bundled("recipes")


def templates_dir() -> Path:
    return _bundled("data_templates")


def cache_dir() -> Path:
    """Root of losia's caches (converted models, tokenized data). `LOSIA_CACHE` moves it."""
    root = os.environ.get("LOSIA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "losia"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
