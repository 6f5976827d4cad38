"""Resumable checkpoints: checkpoints/step-N/ holds everything to continue bit-exactly.

A checkpoint is written into a temp dir and renamed into place, so `latest()` only ever sees
complete ones; older ones beyond `keep_last_n` are pruned after a new one lands.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from losia_cli import atomic

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def save(run_dir: Path, step: int, model, optimizer, method, trainer_state: dict, keep_last_n: int):
    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic.directory(final, overwrite=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(method.state_dict(), tmp / "method.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    for _, old in checkpoints(run_dir)[:-keep_last_n]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, model, optimizer, method) -> dict:
    path = Path(path)
    load_model(model, str(path / "model.safetensors"))
    method.load_state_dict(torch.load(path / "method.pt", weights_only=False))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())
