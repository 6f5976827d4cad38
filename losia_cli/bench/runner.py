"""One method on its own model, stepped by the engine's step driver (engine/step.py) and timed."""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from losia_cli.bench.shapes import Batch, build_model
from losia_cli.engine.step import StepDriver, build_optimizer
from losia_cli.errors import BenchError
from losia_cli.extras import require
from losia_cli.methods import Method, TrainContext, WarmupCosine, method_class, method_names

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


def storage_id(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it); works on meta, where every data_ptr is 0."""
    return t.untyped_storage()._cdata


def _tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from an optimizer-state value."""
    if isinstance(obj, torch.Tensor):
        if storage_id(obj) in seen:
            return 0
        seen.add(storage_id(obj))
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):  # e.g. GaLore's projector object holding its orthogonal matrix
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


# losia_pro_delta: LoSiA-Pro in the delta form FSDP runs (W written only when a block moves), here in
# one process, to price that form against write-through. lora_bf16: LoRA with its adapters in the
# base dtype (peft upcasts them to fp32 by default, which costs activation memory and traffic).
METHODS = ["floor", *method_names(), "lora_bf16", "losia_pro_delta"]
LR, BETAS, EPS = 1e-5, (0.9, 0.999), 1e-8
LONG_RUN = 10**6  # updates of the run a timed step is taken from


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
        self.batch = {"input_ids": batch.input_ids, "labels": batch.input_ids}
        self.scale = 1 / batch.n_targets  # the mean token loss
        self.step_index = 0
        self.times: list[float] = []
        self.memory: dict[str, int] = {}

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
        """Forward + backward while summing the unique storages autograd saves for backward, and the
        gradients' bytes before the optimizer frees them."""
        params = {storage_id(p) for p in self.model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            # Saved tensors stay alive until backward, so no storage id is reused meanwhile.
            if storage_id(t) not in params:
                seen[storage_id(t)] = t.untyped_storage().nbytes()
            return t

        # Tensors are packed only while the forward records them; backward unpacks (identity).
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.driver.forward_backward([self.batch], self.scale)
        self.memory["activation_bytes"] = sum(seen.values())
        self.memory["grad_bytes"] = sum(
            p.grad.numel() * p.grad.element_size() for p in self.model.parameters() if p.grad is not None
        )

    def _account_state(self) -> None:
        memory = self.memory
        memory["optimizer_state_bytes"] = (
            0 if self.optimizer is None else _tensor_bytes(list(self.optimizer.state.values()), set())
        )
        memory["param_bytes"] = sum(p.numel() * p.element_size() for p in self.model.parameters())
        memory["buffer_bytes"] = sum(b.numel() * b.element_size() for b in self.model.buffers())
        # LoSiA's fp32 m x n gradient accumulator and two EMAs of the layer that scores now.
        memory["scorer_bytes"] = sum(
            t.numel() * t.element_size()
            for m in self.model.modules() if getattr(m, "scorer", None) is not None
            for t in m.scorer.state_dict().values()
        )
        parts = ("param_bytes", "buffer_bytes", "grad_bytes", "optimizer_state_bytes", "activation_bytes", "scorer_bytes")
        memory["accounted_bytes"] = sum(memory[k] for k in parts)

    def close(self) -> None:
        self.model = self.optimizer = self.driver = self.method = None
