"""One optimizer step, the same wherever it is taken: the training loop, `losia bench` and the tests.

    set each param group's LR from method.lr_factors(step)
    forward + backward of each micro-batch (summed target-token cross-entropy, or with a preference
        `objective` the summed pair loss (engine/preference.py), times `scale`)
    clip, optimizer.step(), zero_grad()
    method.on_step(step, optimizer)

With an accelerator (the engine) backward goes through it, gradients sync only on the last
micro-batch, and the step runs on accelerate's wrapper of the optimizer; without one it is plain torch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from losia_cli.methods.base import DeviceTimer, Method


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over target tokens (labels != -100)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def build_optimizer(method: Method, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """The method's optimizer over its param groups (None when nothing trains). Each group keeps its
    `base_lr`, which the per-step LR factors multiply."""
    groups = method.param_groups(lr, weight_decay)
    for group in groups:
        group.setdefault("base_lr", group["lr"])
    return method.make_optimizer(groups, lr, betas, eps) if groups else None


def scheduled_lrs(method: Method, optimizer: torch.optim.Optimizer, step: int) -> list[float]:
    """Each param group's LR for the update after `step` completed steps: its `base_lr` times the
    method's factor (warmup + cosine; LoSiA's per-slot rewarm). The engine and the Python API's
    scheduler (losia_cli/api.py) both set LRs from here."""
    factors = method.lr_factors(step, len(optimizer.param_groups))
    return [group["base_lr"] * factor for group, factor in zip(optimizer.param_groups, factors)]


@dataclass
class StepDriver:
    """Takes the optimizer steps of `model` trained by `method` (see the module doc)."""

    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer | None  # its groups' LRs are set, and on_step gets it
    accelerator: Any = None  # accelerate.Accelerator; None: plain torch
    stepper: Any = None  # what .step() runs: accelerate's wrapper of `optimizer` (None: `optimizer`)
    max_grad_norm: float | None = None  # None: no clipping
    autocast: Any = field(default_factory=contextlib.nullcontext)
    method_timer: DeviceTimer | None = None  # times method.on_step; default: on the model's device
    # Seconds per part of the step (forward, backward, optimizer) when given (`losia bench`): one
    # DeviceTimer each, so on CUDA no host sync is added.
    part_timers: dict[str, DeviceTimer] | None = None
    objective: Any = None  # engine/preference.Objective; None: the token loss (sft)

    def __post_init__(self):
        if self.method_timer is None:
            self.method_timer = DeviceTimer(next(self.model.parameters()).device)

    def _part(self, name: str):
        return self.part_timers[name].section() if self.part_timers else contextlib.nullcontext()

    @property
    def method_time_s(self) -> float:
        """Seconds in method.on_step, summed over the steps taken."""
        return self.method_timer.seconds

    def set_lrs(self, step: int) -> None:
        if self.optimizer is None:
            return
        for group, lr in zip(self.optimizer.param_groups, scheduled_lrs(self.method, self.optimizer, step)):
            group["lr"] = lr

    def forward_backward(self, batches: Iterable[dict], scale) -> torch.Tensor:
        """The summed token loss of `batches` (detached); each micro-batch's gradient is that of its
        summed loss times `scale` (a number, or a 0-d tensor on the device)."""
        loss_sum = 0
        for batch in batches:
            inputs = dict(batch)
            labels, reference = inputs.pop("labels"), inputs.pop("reference", None)
            with self._accumulate(), self.autocast:
                with self._part("forward"):
                    logits = self.model(**inputs, use_cache=False).logits
                    if self.objective is None:
                        loss = token_loss_sum(logits, labels)
                    else:
                        loss = self.objective.loss_sum(logits, labels, reference)
                with self._part("backward"):
                    if self.accelerator is None:
                        (loss * scale).backward()
                    else:
                        self.accelerator.backward(loss * scale)
            loss_sum += loss.detach()
        return loss_sum

    def update(self, step: int) -> torch.Tensor | None:
        """Clip, step, zero the gradients, then `method.on_step`; the gradient norm before clipping
        (a tensor on the device: reading it is a host sync, left to whoever logs it)."""
        grad_norm = None
        if self.optimizer is not None:
            with self._part("optimizer"):
                if self.max_grad_norm is not None:
                    grad_norm = self._clip()
                (self.stepper or self.optimizer).step()  # under DeepSpeed a no-op: it stepped in backward
                (self.stepper or self.optimizer).zero_grad(set_to_none=True)
        with self.method_timer.section():
            self.method.on_step(step, self.optimizer)
        return grad_norm

    def step(self, step: int, batches: Iterable[dict], scale) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One whole optimizer step: (summed token loss, gradient norm before clipping)."""
        self.set_lrs(step)
        loss_sum = self.forward_backward(batches, scale)
        return loss_sum, self.update(step)

    def _accumulate(self):
        # accumulate(): no gradient sync (DDP) / no DeepSpeed step until the last micro-batch.
        return self.accelerator.accumulate(self.model) if self.accelerator else contextlib.nullcontext()

    def _clip(self) -> torch.Tensor | None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.accelerator is None:
            return torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        # Under DeepSpeed only read: it clipped inside its own step.
        norm = self.accelerator.clip_grad_norm_(params, self.max_grad_norm)
        if isinstance(norm, DTensor):  # FSDP's norm of sharded gradients
            norm = norm.full_tensor()
        return None if norm is None else torch.as_tensor(norm)
