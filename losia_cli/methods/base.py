"""The one small interface every fine-tuning method implements.

The training loop (engine/loop.py) only ever talks to a method through this class:

    model = method.prepare(model, ctx)              # swap layers / freeze / wrap with peft
    opt = AdamW(method.param_groups(lr, wd))        # groups may carry their own eps etc.
    for step in range(total_steps):                 # `step` = optimizer steps already taken
        factors = method.lr_factors(step)           # one LR multiplier per param group
        for micro_batch in ...: loss.backward()     # the method may capture things in backward
        opt.step(); opt.zero_grad()
        method.on_step(step, opt)                   # LoSiA: score, write-through, re-localize
    method.finalize(model)                          # every rank
    plain = method.export(model)                    # what `final/` holds (save_pretrained)

Everything a method needs to resume lives in `model.state_dict()` (buffers and parameters, e.g.
LoSiA's R, C and `sub`) plus `method.state_dict()` (counters, rewarm phase, score EMAs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class WarmupCosine:
    """Global LR multiplier: linear warmup to 1, then cosine down to `min_ratio`.

    `factor(t)` is the multiplier used by the update that follows `t` completed optimizer steps,
    so the very first update (t=0) of a run with warmup uses 0 (as the reference does).
    """

    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0

    def cosine(self, x: float) -> float:
        """c(x) = rho + (1 - rho) * (1 + cos(pi x)) / 2, for x in [0, 1]."""
        x = min(max(x, 0.0), 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * x))

    def factor(self, t: int) -> float:
        if t < self.warmup_steps:
            return t / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        return self.cosine((t - self.warmup_steps) / decay_steps)


@dataclass
class TrainContext:
    """What the engine tells a method about the run it is part of."""

    schedule: WarmupCosine
    total_steps: int
    grad_accum: int = 1
    seed: int = 0
    # Appends one record to the run's subnets.jsonl (LoSiA's (re)localizations).
    log_subnet: Callable[[dict], None] = lambda record: None
    # Distributed: world size and a hook to all-reduce (sum) a tensor in place; identity when single.
    world_size: int = 1
    all_reduce_sum: Callable[[torch.Tensor], None] = lambda tensor: None
    broadcast_from_main: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor
    # Call after changing trainable parameters outside the optimizer (LoSiA's re-localization): under
    # ZeRO the optimizer updates its own fp32 master copies, which must be re-read from the model.
    refresh_master_weights: Callable[[], None] = lambda: None
    # FSDP / ZeRO-3 will shard the weights themselves (prepare() still sees them whole).
    sharded_weights: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class: full fine-tuning behaviour, overridden piece by piece by other methods."""

    name = "base"

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.model: nn.Module | None = None
        self.ctx: TrainContext | None = None

    # --- building -----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        """Return the model to train (may be the same object, modified in place)."""
        self.model, self.ctx = model, ctx
        return model

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Param groups for torch.optim.AdamW; only parameters that should be trained."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "all"}]

    # --- per step -----------------------------------------------------------------------------
    def lr_factors(self, step: int, num_groups: int) -> list[float]:
        """LR multiplier of each param group for the update after `step` completed steps."""
        return [self.ctx.schedule.factor(step)] * num_groups

    def on_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called right after optimizer.step() of the update that followed `step` completed steps."""

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # --- results ------------------------------------------------------------------------------
    def finalize(self, model: nn.Module) -> None:
        """On every rank after the last step, before the weights are gathered for `final/`: bring them
        into their final form (LoSiA's delta form writes its blocks into W here)."""

    def export(self, model: nn.Module) -> nn.Module:
        """The model `final/` is written from with save_pretrained (a plain HF model for full FT)."""
        return model

    def save(self, exported: nn.Module, path, state_dict: dict | None = None) -> None:
        """Write `final/` from what export() returned (with the gathered `state_dict` when the
        training sharded the weights: FSDP, ZeRO-3)."""
        exported.save_pretrained(path, state_dict=state_dict)

    def describe(self) -> dict:
        """Trainable parameter count and the bytes of AdamW state they imply (two moments each)."""
        params = [p for g in self.param_groups(0.0, 0.0) for p in g["params"]]
        return {
            "method": self.name,
            "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "optimizer_state_bytes": sum(2 * p.numel() * p.element_size() for p in params),
        }
