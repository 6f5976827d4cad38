"""Resumable checkpoints: checkpoints/step-N/ holds everything to continue bit-exactly.

A checkpoint is written into a temp dir, fsynced and renamed into place, so `latest()` only ever sees
complete ones (a crash mid-write leaves only a `.step-N.tmp` dir, which it ignores); older ones beyond
`keep_last_n` are pruned after a new one lands. Its manifest.json lists every file's size and sha256:
`newest_intact()` skips a checkpoint the disk has since damaged, with a warning, for the one before.

Under FSDP, rank 0 writes the weights and the optimizer state gathered whole (torch.distributed.checkpoint's
full state dicts), and every rank takes its shards back from them on resume.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from losia_cli import atomic
from losia_cli.engine.distributed import deepspeed_optimizer
from losia_cli.errors import ConfigError

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


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


def _torch_save(obj, path: Path) -> None:
    """torch.save through a file we open. Given a path, PyTorch's C++ writer loses the OS's error (a full
    disk reads "PytorchStreamWriter failed writing file"); given a file, our write raises the OSError
    and torch's closing of the archive then fails on top of it: the OSError is what is re-raised."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def _unique_tensors(model) -> dict[str, torch.Tensor]:
    """The state dict with tied weights (same tensor) listed once, under their first name."""
    unique, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()  # identity is what counts here, not the values
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype) if tensor.numel() else name
        if key not in seen:
            seen.add(key)
            unique[name] = tensor.detach()
    return unique


def _is_sharded(model) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def whole_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """Collective: a sharded model's full state dict (tied weights once) on rank 0, {} elsewhere."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(model)  # ZeRO-3 gathers its partitions
    state = get_model_state_dict(model, options=_WHOLE)
    return {name: state[name] for name in _unique_tensors(model) if name in state}


def save_weights(model, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model's weights (tied ones once); `state` is the whole_state_dict of a sharded model."""
    tensors = _unique_tensors(model) if state is None else state
    # ZeRO turns trainable parameters into views of one flat buffer per group; safetensors stores
    # whole storages only, so such views are copied out (they are the small trainable tensors).
    tensors = {
        name: t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t.contiguous()
        for name, t in tensors.items()
    }
    save_file(tensors, str(path))


def load_weights(model, path: Path) -> None:
    tensors = load_file(str(path))
    if set(tensors) != set(_unique_tensors(model)):
        raise ConfigError(f"{path} does not hold this model's weights (different parameter names)")
    if _is_sharded(model):  # every rank keeps its part of the whole tensors
        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(tensors, strict=False)  # the tied names not listed share the loaded memory


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(ckpt: Path) -> None:
    """manifest.json: the size and sha256 of every file of the checkpoint dir `ckpt`."""
    files = sorted(p for p in ckpt.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=2))


def damage(ckpt: Path) -> str | None:
    """Why the checkpoint dir `ckpt` cannot be trusted (a missing, truncated or altered file), or None.
    One without a manifest was written before checkpoints had one: it is taken as it is, if it holds
    its trainer state at all (an emptied dir does not)."""
    if not (ckpt / MANIFEST).exists():
        return None if (ckpt / "trainer_state.json").is_file() else "trainer_state.json is missing"
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"{MANIFEST} is unreadable"
    for name, entry in manifest.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def newest_intact(run_dir: Path, warn) -> Path | None:
    """The newest checkpoint whose files match its manifest; `warn(line)` about each one skipped."""
    for _, path in reversed(checkpoints(run_dir)):
        reason = damage(path)
        if reason is None:
            return path
        warn(f"checkpoint {path} is damaged ({reason}); trying the one before")
    return None


def save(run_dir: Path, step: int, accelerator, model, optimizer, method, trainer_state: dict, keep_last_n: int,
         name: str | None = None):
    """Collective: every rank calls it. Rank 0 writes the shared state; every rank its RNG and, under
    ZeRO, its shard of the optimizer state. The dir is renamed into place once all parts are there.
    `name` (e.g. "best") saves outside the step-N rotation that keep_last_n prunes."""
    final = Path(run_dir) / "checkpoints" / (name or f"step-{step}")
    main, rank = accelerator.is_main_process, accelerator.process_index
    zero = deepspeed_optimizer(accelerator)
    whole_model = whole_optimizer = None
    if _is_sharded(model):  # collective: every rank takes part in gathering, rank 0 receives
        whole_model = whole_state_dict(accelerator, model)
        whole_optimizer = get_optimizer_state_dict(model, optimizer, options=_WHOLE)
    with atomic.directory(final, overwrite=True) if main else nullcontext(atomic.temp_path_for(final)) as tmp:
        accelerator.wait_for_everyone()  # rank 0 has made the temp dir
        _torch_save(_rng_state(), tmp / f"rng-rank{rank}.pt")
        if zero is not None:
            _torch_save(zero.state_dict(), tmp / f"optimizer-rank{rank}.pt")
        accelerator.wait_for_everyone()
        if main:
            save_weights(model, tmp / "model.safetensors", whole_model)
            if whole_optimizer is not None:
                _torch_save(whole_optimizer, tmp / "optimizer.pt")
            elif zero is None:  # DDP / single: the optimizer state is the same on every rank
                _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
            _torch_save(method.state_dict(), tmp / "method.pt")
            state = {**trainer_state, "step": step, "world_size": accelerator.num_processes,
                     "sharded": whole_model is not None}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            write_manifest(tmp)  # last: every rank's files are in by now
    if main:
        for _, old in checkpoints(run_dir)[:-keep_last_n]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()  # nobody runs ahead (or resumes) before the rename
    return final


def _torch_load(path: Path):
    """A checkpoint file's objects on the CPU, whichever device wrote them: the loaders below copy them
    onto each rank's own device (without a map_location every rank would land rank 0's tensors on
    cuda:0), and RNG states must be CPU tensors anyway."""
    return torch.load(path, map_location="cpu", weights_only=False)


def load(path: Path, accelerator, model, optimizer, method) -> dict:
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    saved_world, rank = state.get("world_size", 1), accelerator.process_index
    zero = deepspeed_optimizer(accelerator)
    if state.get("sharded", False) != _is_sharded(model):
        # LoSiA's delta form leaves blocks out of W until they move, and the optimizer state is keyed
        # differently: such a checkpoint only continues under the same kind of set-up.
        written = "dist=fsdp" if state.get("sharded") else "unsharded weights (single, ddp, zero2)"
        raise ConfigError(f"run.resume: {path} was written under {written}; resume it the same way")
    if zero is not None and saved_world != accelerator.num_processes:
        raise ConfigError(
            f"run.resume: {path} holds ZeRO optimizer shards of {saved_world} processes; "
            f"resume with dist.num_processes={saved_world}"
        )
    load_weights(model, path / "model.safetensors")
    method.load_state_dict(_torch_load(path / "method.pt"))
    if zero is not None:
        shards = [_torch_load(path / f"optimizer-rank{r}.pt") for r in range(saved_world)]
        zero.load_state_dict(shards, load_from_fp32_weights=True)
    elif _is_sharded(model):
        whole = _torch_load(path / "optimizer.pt")
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(model, optimizer, whole, options=options)
        # A tensor with no saved state (LoSiA had just reset its moments) starts fresh again, not from
        # the zero state the loader gives every parameter first.
        for name, param in model.named_parameters():
            if param.requires_grad and name not in whole["state"]:
                optimizer.state.pop(param, None)
    else:
        optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
    # A different number of processes gets rank 0's RNG for the new ranks (no longer bit-exact anyway).
    rng = path / f"rng-rank{rank if rank < saved_world else 0}.pt"
    _set_rng_state(_torch_load(rng))
    return state
