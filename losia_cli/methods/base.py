"""The one small interface every fine-tuning method implements.

The training loop (engine/loop.py) only ever talks to a method through this class:

    model = method.prepare(model, ctx)              # swap layers / freeze / wrap with peft
    opt = method.make_optimizer(method.param_groups(lr, wd), ...)  # AdamW unless overridden
    for step in range(total_steps):                 # `step` = optimizer steps already taken
        factors = method.lr_factors(step)           # one LR multiplier per param group
        for micro_batch in ...: loss.backward()     # the method may capture things in backward
        opt.step(); opt.zero_grad()
        method.on_step(step, opt)                   # LoSiA: score, write-through, re-localize
    method.finalize(model)                          # every rank
    plain = method.export(model)                    # what `final/` holds (save_pretrained)
    report.update(method.report_extras())           # report.json fields of the method's own

The engine drives each step through engine/step.py; a method reaches the run only through its
`TrainContext` (schedule, `dist` for the other processes, `records` for its own JSONL streams).

Everything a method needs to resume lives in `model.state_dict()` (buffers and parameters, e.g.
LoSiA's R, C and `sub`) plus `method.state_dict()` (counters, rewarm phase, score EMAs).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

def method_config(cls: type) -> type:
    """Decorator of a method's config (the `method:` section): a plain dataclass, so that `losia bench`
    builds methods with torch, transformers and peft alone. The run config (config.py) validates it with
    pydantic all the same: field types, unknown keys refused, field docstrings as descriptions; ranges
    are checked in `__post_init__` with `check`."""
    cls.__pydantic_config__ = {"extra": "forbid", "use_attribute_docstrings": True}
    return dataclass(cls)


def check(ok: bool, key: str, rule: str, value: Any) -> None:
    """A method config's range check; the message names the key as the user wrote it."""
    if not ok:
        raise ValueError(f"method.{key}: {rule} (got {value!r})")


class DeviceTimer:
    """Summed seconds of timed sections, on the device's clock. On CUDA, where kernels run after the
    host has moved on, a section is a pair of CUDA events, read once its end has completed: what the
    section cost the GPU (its kernels and any idle wait for the host), with no host sync per section.
    Elsewhere the work is done when the call returns: perf_counter."""

    def __init__(self, device: torch.device | None):
        self.cuda = device is not None and device.type == "cuda"
        self._seconds = 0.0
        self._pending: list[tuple[Any, Any]] = []  # CUDA (start, end) events not read yet

    @contextlib.contextmanager
    def section(self):
        if not self.cuda:
            started = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - started
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._pending.append((start, end))
        self._read(wait=False)

    def _read(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][1].query()):
            start, end = self._pending.pop(0)
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000  # milliseconds

    @property
    def seconds(self) -> float:
        """The total so far (waits for the sections still running on the device)."""
        self._read(wait=True)
        return self._seconds


def adamw(groups: list[dict], lr: float, betas, eps: float) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel for all tensors) when every parameter is on CUDA, else the
    foreach form (one op per state tensor kind, not per parameter)."""
    fused = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)


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


class Distributed:
    """What a method may ask of the processes it trains in. This base is one process; the engine
    passes its accelerate-backed subclass (engine/distributed.py) when there are more."""

    world_size = 1
    rank = 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the processes, in place."""

    def broadcast_from_main(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor`, on every rank."""
        return tensor

    def params_changed(self) -> None:
        """Call after changing trainable parameters outside the optimizer (LoSiA's re-localization):
        under ZeRO the optimizer updates its own fp32 master copies, which must be re-read."""


class Records:
    """Where a method writes its records: one JSONL stream of the run dir per name (`subnets` is
    LoSiA's (re)localizations). This base drops them (benchmarks, resumed runs' initial blocks)."""

    def write(self, stream: str, record: dict) -> None:
        pass

    @property
    def listening(self) -> bool:
        """Whether writes go anywhere (a subclass overrides `write`): records nobody reads are not built."""
        return type(self).write is not Records.write


@dataclass
class TrainContext:
    """What the engine tells a method about the run it is part of."""

    schedule: WarmupCosine
    total_steps: int
    grad_accum: int = 1
    seed: int = 0
    records: Records = field(default_factory=Records)
    dist: Distributed = field(default_factory=Distributed)
    # FSDP / ZeRO-3 will shard the weights themselves (prepare() still sees them whole).
    sharded_weights: bool = False


class Method:
    """Base class: full fine-tuning behaviour, overridden piece by piece by other methods.

    The class attributes are the method's capabilities, read by config, merge, continual and bench
    through the registry (methods/registry.py); a new method sets them and registers in one line.
    """

    name = "base"
    names: ClassVar[tuple[str, ...]] = ()
    """The recipe's `method.name` values this class implements (`method=<name>`)."""
    config_class: ClassVar[type | None] = None
    """The `method:` section's class (a `method_config` dataclass); its `name` field is a Literal of `names`."""
    export_kind: ClassVar[str] = "full"
    """What `final/` holds: "full" weights (a plain HF model) or an "adapter" that `losia merge` folds."""
    unsupported_dist: ClassVar[dict[str, str]] = {}
    """{dist.name: why not} for the set-ups that would train silently wrong; `{method}` and `{dist}`
    in the reason are filled in."""
    requires: ClassVar[tuple[str, str] | None] = None
    """(module, pip package) of an optional dependency the method cannot run without."""

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

    def make_optimizer(self, groups: list[dict], lr: float, betas, eps: float) -> torch.optim.Optimizer:
        """The optimizer over `groups`: AdamW, unless a method brings its own (GaLore's projected Adam)."""
        return adamw(groups, lr, betas, eps)

    @classmethod
    def sized_config(cls, name: str, rank: int, **options):
        """The config of method `name` at the parameter budget of LoRA rank `rank` (bench compares
        methods at one budget); `options` are method-specific knobs, ignored where they do not apply."""
        return cls.config_class(name=name)

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

    def report_extras(self) -> dict:
        """Fields the method adds to report.json. `relocalization_time_s` is in the report's contract
        for every method: 0 where nothing re-localizes."""
        return {"relocalization_time_s": 0.0}

    def describe(self) -> dict:
        """Trainable parameter count and the bytes of AdamW state they imply (two moments each)."""
        params = [p for g in self.param_groups(0.0, 0.0) for p in g["params"]]
        return {
            "method": self.name,
            "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "optimizer_state_bytes": sum(2 * p.numel() * p.element_size() for p in params),
            "targets": self.target_account(),
        }

    def target_account(self) -> dict:
        """What the method trains and leaves out, and why (methods/targets.py `account`); the start line
        and report.json's `targets`. Full fine-tuning trains everything."""
        return {"all": True}
