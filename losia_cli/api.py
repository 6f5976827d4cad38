"""LoSiA (and every other registered method) in your own training code: a plain PyTorch loop, the
`transformers` Trainer, or TRL's trainers.

    tuned = losia_cli.prepare(model, method="losia_pro", rank_factor=0.125, period=50, total_steps=1000)
    optimizer = tuned.optimizer(lr=5e-4, weight_decay=0.0)
    scheduler = tuned.scheduler(optimizer, warmup_ratio=0.1)  # warmup + cosine + LoSiA's rewarming
    for batch in loader:
        tuned.model(**batch).loss.backward()
        optimizer.step(); scheduler.step(); tuned.step(optimizer); optimizer.zero_grad()
    tuned.save_pretrained("out/")  # a plain transformers dir, as `losia merge` writes

This is a thin layer over the engine's own pieces, not a second implementation: the `Method` from the
registry (methods/), `engine/step.py`'s `build_optimizer` and `scheduled_lrs`, and `method.on_step`
after each update, in the order `losia train` calls them (tests/test_api.py checks bit for bit).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from losia_cli import atomic
from losia_cli.errors import ConfigError
from losia_cli.methods import Method, Records, TrainContext, WarmupCosine, build_method, method_names

_PREPARED = "_losia_prepared"  # set on a model prepare() has changed


class _Listeners(Records):
    """The method's records (LoSiA's `subnets`): kept in `Tuned.records` and passed to each listener."""

    def __init__(self):
        self.kept: list[dict] = []
        self.listeners: list[Callable[[str, dict], None]] = []

    def write(self, stream: str, record: dict) -> None:
        self.kept.append({"stream": stream, **record})
        for listener in self.listeners:
            listener(stream, record)


def prepare(model: nn.Module, method: str = "losia_pro", *, total_steps: int, seed: int = 0,
            on_record: Callable[[str, dict], None] | None = None, accelerator=None, **options) -> "Tuned":
    """Get `model` ready to train with `method` (a registered name: losia_pro, losia, lora, dora, pissa,
    galore, full); `options` are that method's recipe keys (`method.*`, e.g. rank_factor, period, rank),
    validated as in a recipe. `total_steps` is the number of optimizer steps (the LR schedule and LoSiA's
    time slots need it); `seed` picks LoSiA's initial random blocks, as `seed:` in a recipe.
    `on_record(stream, record)` sees each record the method writes (LoSiA: "subnets", one per block
    placed). With `accelerator` (accelerate's, in your own multi-process loop) LoSiA's scores see the
    all-reduced gradient, as in `losia train`.

    Call it on the model already on its device and in its dtype. Train `tuned.model` (for LoRA-family
    methods it is peft's wrapper; LoSiA and GaLore change `model` in place and return it)."""
    from pydantic import TypeAdapter, ValidationError

    from losia_cli.config import MethodConfig, format_validation_error

    if method not in method_names():
        raise ConfigError(f"prepare(method={method!r}): no such method; one of {', '.join(method_names())}")
    if getattr(model, _PREPARED, False):
        raise ConfigError("prepare(): this model is prepared already; prepare a fresh copy of the base model")
    if not (isinstance(total_steps, int) and total_steps >= 1):
        raise ConfigError(f"prepare(total_steps={total_steps!r}): must be an int >= 1")
    try:
        cfg = TypeAdapter(MethodConfig).validate_python({"name": method, **options})
    except ValidationError as e:
        raise ConfigError(f"prepare(): {format_validation_error(e, ('method',))}") from None
    records = _Listeners()
    if on_record is not None:
        records.listeners.append(on_record)
    ctx = TrainContext(schedule=WarmupCosine(total_steps), total_steps=total_steps, seed=seed, records=records)
    if accelerator is not None:
        from losia_cli.engine.distributed import AcceleratorDist

        ctx.dist = AcceleratorDist(accelerator)
    built = build_method(cfg)
    trained = built.prepare(model, ctx)
    for changed in {id(model): model, id(trained): trained}.values():
        setattr(changed, _PREPARED, True)
    return Tuned(trained, built, ctx, records)


class Tuned:
    """A model prepared for one method, and the calls a training loop makes around it (see the module doc)."""

    def __init__(self, model: nn.Module, method: Method, ctx: TrainContext, records: _Listeners):
        self.model = model
        self.method = method
        self.ctx = ctx
        self._records = records
        self.steps = 0  # optimizer updates taken (and followed by step())
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler: MethodLR | None = None
        self._updates = 0  # optimizer.step() calls since the last step()

    @property
    def total_steps(self) -> int:
        return self.ctx.total_steps

    @property
    def records(self) -> list[dict]:
        """Every record the method wrote in this process, oldest first, with its "stream" (LoSiA's
        "subnets": step, layer, slot, module, shape, rows, cols, score_mass, overlap_prev, source)."""
        return list(self._records.kept)

    def subnets(self):
        """An iterator over LoSiA's subnet records so far (as subnets.jsonl holds them)."""
        return ({k: v for k, v in r.items() if k != "stream"} for r in self._records.kept if r["stream"] == "subnets")

    # --- the optimizer and its schedule -------------------------------------------------------------
    def optimizer(self, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        """The method's optimizer (AdamW over its param groups; GaLore's projected Adam), as `losia train`
        builds it."""
        from losia_cli.engine.step import build_optimizer

        optimizer = build_optimizer(self.method, lr, weight_decay, tuple(betas), eps)
        if optimizer is None:
            raise ConfigError(f"{self.method.name}: nothing in the model trains (no parameter requires grad)")
        optimizer.register_step_post_hook(self._count_update)
        self._optimizer, self._scheduler = optimizer, None
        return optimizer

    def _count_update(self, optimizer, args, kwargs) -> None:
        self._updates += 1

    def scheduler(self, optimizer: torch.optim.Optimizer, warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0):
        """The LR schedule of `losia train` (linear warmup over warmup_ratio * total_steps, cosine down to
        min_lr_ratio; LoSiA's rewarm after each re-localization), as a torch LR scheduler."""
        self._own(optimizer)
        if self.steps:
            raise ConfigError(f"scheduler(): {self.steps} steps are taken already; make it before the first")
        if not 0.0 <= warmup_ratio <= 1.0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"scheduler(warmup_ratio={warmup_ratio}, min_lr_ratio={min_lr_ratio}): each in [0, 1]")
        # LoSiA's rewarm holds this very schedule object: set it in place.
        self.ctx.schedule.warmup_steps = int(warmup_ratio * self.total_steps)
        self.ctx.schedule.min_ratio = min_lr_ratio
        self._scheduler = MethodLR(optimizer, self)
        return self._scheduler

    def _own(self, optimizer) -> torch.optim.Optimizer:
        """`optimizer` unwrapped (accelerate's AcceleratedOptimizer), if it is the one optimizer() made."""
        while optimizer is not self._optimizer and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        if optimizer is not self._optimizer:
            raise ConfigError("pass the optimizer tuned.optimizer() returned (the method resets its state "
                              "at a re-localization and sets its LRs)")
        return optimizer

    # --- per step -----------------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Call once after each optimizer.step() (before or after scheduler.step()): the method's own
        per-step work (LoSiA: importance scores, write-through into W, re-localization)."""
        optimizer = self._own(optimizer)
        if self._updates != 1:
            raise ConfigError(
                f"tuned.step(): {self._updates} optimizer.step() calls since the last tuned.step(); "
                "call it exactly once after each optimizer.step()"
            )
        if self.steps >= self.total_steps:
            raise ConfigError(f"tuned.step(): all total_steps={self.total_steps} steps are taken")
        self.method.on_step(self.steps, optimizer)
        self._updates = 0
        self.steps += 1
        if self._scheduler is not None:  # a re-localization restarts its slot's LR ramp: set the next LRs now
            self._scheduler.apply()

    # --- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What model.state_dict(), optimizer.state_dict() do not hold: save all three to resume exactly."""
        return {"steps": self.steps, "method": self.method.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["method"])
        self.steps, self._updates = state["steps"], 0
        if self._scheduler is not None:
            self._scheduler.apply()

    # --- results ------------------------------------------------------------------------------------
    def merged(self) -> nn.Module:
        """The trained model as a plain transformers model, what `losia merge` writes: LoSiA's blocks are
        in W already (it shares W with `model`, training can go on); a LoRA-family adapter is folded
        into a copy of the model (peft's merge_and_unload)."""
        self.method.finalize(self.model)
        plain = self.method.export(self.model)
        if self.method.export_kind == "adapter":
            plain = copy.deepcopy(plain).merge_and_unload()
        if plain is not self.model:
            plain.__dict__.pop(_PREPARED, None)  # a copy: a fresh model as far as prepare() is concerned
        return plain

    def save_pretrained(self, path, tokenizer=None, overwrite: bool = False) -> Path:
        """Write merged() (and `tokenizer`) to `path` as a plain transformers dir, atomically."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} exists already; pass overwrite=True to replace it")
        with atomic.directory(path, overwrite=overwrite) as tmp:
            self.merged().save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return path

    # --- transformers Trainer / TRL -----------------------------------------------------------------
    def trainer_kwargs(self, lr: float, weight_decay: float = 0.0, warmup_ratio: float = 0.0,
                       min_lr_ratio: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8) -> dict:
        """`Trainer(model=tuned.model, ..., **tuned.trainer_kwargs(lr=...))`: the method's optimizer and schedule, and a
        callback that calls step() after each update, writes subnets.jsonl into args.output_dir and
        saves / restores the method's state with the Trainer's own checkpoints. The Trainer's
        learning_rate, warmup and scheduler arguments are not used: these are."""
        from losia_cli.trainer import LosiaCallback

        optimizer = self.optimizer(lr, weight_decay, betas, eps)
        scheduler = self.scheduler(optimizer, warmup_ratio, min_lr_ratio)
        return {"optimizers": (optimizer, scheduler), "callbacks": [LosiaCallback(self)]}


class MethodLR(torch.optim.lr_scheduler.LRScheduler):
    """The LRs `losia train` would set before update `tuned.steps` (engine/step.py's `scheduled_lrs`).
    They depend on the updates taken, not on how often step() is called, so any order of
    scheduler.step() and tuned.step() gives the same LRs, as does a wrapper that steps it per process."""

    def __init__(self, optimizer: torch.optim.Optimizer, tuned: Tuned):
        self.tuned = tuned
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        from losia_cli.engine.step import scheduled_lrs

        return scheduled_lrs(self.tuned.method, self.optimizer, self.tuned.steps)

    def apply(self) -> None:
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def state_dict(self) -> dict:  # the LRs follow from the method's state; nothing of its own to save
        return {key: value for key, value in super().state_dict().items() if key != "tuned"}
