"""Do all ranks hold the same model? A SHA-256 over each rank's replicated tensors, compared across ranks.

A hash, unlike a per-tensor sum, changes when two elements swap or two errors cancel.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from losia_cli.provenance import tensor_sha256


def replicated_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors every rank holds a whole copy of, by name. Sharded parameters (FSDP2 DTensors,
    ZeRO-3's partitioned ones, marked `ds_id`) are left out: each element of those lives on one rank
    only, so there is nothing to disagree on. Buffers (LoSiA's R and C) are always replicated."""
    params = {
        name: p for name, p in model.named_parameters(remove_duplicate=False)
        if not isinstance(p, DTensor) and not hasattr(p, "ds_id")
    }
    return {**params, **dict(model.named_buffers())}


def fingerprint(model: nn.Module) -> torch.Tensor:
    """SHA-256 over the names, shapes, dtypes and bytes of the replicated tensors, as 32 int64 values
    (a dtype every collective backend gathers)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(replicated_tensors(model).items()):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{tensor_sha256(tensor)}\n".encode())
    return torch.tensor(list(digest.digest()), dtype=torch.int64)


def ranks_in_sync(accelerator, model: nn.Module) -> bool:
    """Every rank's replicated tensors hash the same (a collective: all ranks call it)."""
    if accelerator.num_processes == 1:
        return True
    mine = fingerprint(model).to(accelerator.device)
    gathered = accelerator.gather(mine).view(accelerator.num_processes, -1)
    return bool((gathered == gathered[0]).all())
