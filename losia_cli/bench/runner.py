"""One method on its own model, stepped by the engine's step driver (engine/step.py) and timed."""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from losia_cli.bench.shapes import Batch, build_model
from losia_cli.engine import memory
from losia_cli.engine.step import StepDriver, build_optimizer
from losia_cli.errors import BenchError
from losia_cli.extras import require
from losia_cli.methods import Method, TrainContext, WarmupCosine, method_class, method_names
from losia_cli.methods.base import DeviceTimer

class FloorMethod(Method):
    """Lower bound of any PEFT method: all weights frozen, but the embedding output requires grad so
    backward still runs through every layer (input gradients only, no weight gradients, no optimizer)."""

    name = "floor"

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        return super().prepare(model, ctx)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        return []


# losia_pro_delta: LoSiA-Pro in the delta form FSDP runs (W written only when a block moves), here in
# one process, to price that form against write-through. lora_bf16: LoRA with its adapters in the
# base dtype (peft upcasts them to fp32 by default, which costs activation memory and traffic).
METHODS = ["floor", *method_names(), "lora_bf16", "losia_pro_delta"]
LR, BETAS, EPS = 1e-5, (0.9, 0.999), 1e-8
LONG_RUN = 10**6  # updates of the run a timed step is taken from
LOSIA_PARTS = ("scorer", "write_through", "relocalization")  # LoSiA's on_step, each with its `{name}_timer`


def make_method(name: str, lora_rank: int, rank_factor: float | None, period: int | None) -> Method:
    """Method `name` at the parameter budget of LoRA rank `lora_rank` (registry: methods/registry.py)."""
    if name == "floor":
        return FloorMethod(None)
    if name not in METHODS:
        raise BenchError(f"unknown method '{name}'; known: {', '.join(METHODS)}")
    base = name.removesuffix("_delta").removesuffix("_bf16")
    cls = method_class(base)
    if cls.requires:
        require(*cls.requires, f"method {name}")
    cfg = cls.sized_config(base, lora_rank, rank_factor=rank_factor, period=period)
    if name == "lora_bf16":
        cfg = dataclasses.replace(cfg, adapter_dtype="base")
    return cls(cfg)


class Runner:
    """One method on its own model: the engine's step (grad_accum 1), timed, optionally accounted."""

    def __init__(self, name: str, spec: dict, batch: Batch):
        self.name = name
        self.device = torch.device(spec["device"])
        total = spec["warmup"] + spec["steps"]
        # The context is that of a long run (a slot near its end would not score): the steady state.
        ctx = TrainContext(schedule=WarmupCosine(total_steps=total), total_steps=LONG_RUN, seed=spec["seed"],
                           sharded_weights=name.endswith("_delta"))
        self.method = make_method(name, spec["lora_rank"], spec["rank_factor"], spec.get("period"))
        model = build_model(spec["model"], spec["device"], spec["dtype"], spec["seed"], spec.get("attention"))
        self.model = self.method.prepare(model, ctx)
        if spec["activation_checkpointing"]:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.optimizer = build_optimizer(self.method, LR, 0.0, BETAS, EPS)
        self.driver = StepDriver(self.model, self.method, self.optimizer)
        self.start_parts()
        self.batch = {"input_ids": batch.input_ids, "labels": batch.input_ids}
        self.scale = 1 / batch.n_targets  # the mean token loss
        self.step_index = 0
        self.times: list[float] = []
        self.memory: dict[str, int] = {}

    def start_parts(self) -> None:
        """Start timing the parts of the step anew (after the warmup steps)."""
        self.driver.part_timers = {name: DeviceTimer(self.device) for name in ("forward", "backward", "optimizer")}
        self.driver.method_timer = DeviceTimer(self.device)
        for name in LOSIA_PARTS:
            if hasattr(self.method, f"{name}_timer"):
                setattr(self.method, f"{name}_timer", DeviceTimer(self.device))

    def part_times(self) -> dict[str, float]:
        """Mean seconds per timed step of each part: forward (with the loss), backward, optimizer
        (clip, step, zero_grad), and method.on_step: for LoSiA split into scorer (the score's EMA
        update; its gradient accumulation runs inside backward), write_through, relocalization and
        the rest of on_step (method_other)."""
        n = max(1, len(self.times))
        parts = {name: timer.seconds / n for name, timer in self.driver.part_timers.items()}
        method = self.driver.method_time_s / n
        for name in LOSIA_PARTS:
            if hasattr(self.method, f"{name}_timer"):
                parts[name] = getattr(self.method, f"{name}_timer").seconds / n
                method -= parts[name]
        parts["method_other"] = method
        return parts

    def step(self, account: bool = False) -> float:
        """One timed step; `account` also measures what it holds (memory: see the package doc)."""
        t0 = time.perf_counter()
        self.driver.set_lrs(self.step_index)
        if account:
            self._accounted_forward_backward()
        else:
            self.driver.forward_backward([self.batch], self.scale)
        self.driver.update(self.step_index)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        self.step_index += 1
        if account:
            self._account_state()
        return elapsed

    def _accounted_forward_backward(self) -> None:
        """Forward + backward counting what the forward saves for backward and the gradients' bytes
        before the optimizer frees them (engine/memory.py: the engine's report counts the same)."""
        account = memory.StepAccount(self.model)
        with account.measuring():
            self.driver.forward_backward([self.batch], self.scale)
        self.memory["activation_bytes"] = account.activations
        self.memory["grad_bytes"] = account.gradients

    def _account_state(self) -> None:
        state = memory.state_bytes(self.model, self.optimizer)
        self.memory.update(param_bytes=state["parameters"], buffer_bytes=state["buffers"],
                           scorer_bytes=state["scorers"], optimizer_state_bytes=state["optimizer_state"])
        parts = ("param_bytes", "buffer_bytes", "grad_bytes", "optimizer_state_bytes", "activation_bytes", "scorer_bytes")
        self.memory["accounted_bytes"] = sum(self.memory[k] for k in parts)

    def close(self) -> None:
        self.model = self.optimizer = self.driver = self.method = None
