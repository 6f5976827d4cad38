"""Accelerate set-up for `dist=single|ddp|fsdp|zero2|zero3` (recipes/dist/).

Every process builds the same Accelerator from the same config; `losia train` has already relaunched
itself through `accelerate launch` (losia_cli/launch.py) when more than one process is asked for.

FSDP is applied here with torch's own FSDP2 (`fully_shard`), not through accelerate's plugin: accelerate
only shards on CUDA and silently falls back to DDP elsewhere, and the same code path should run (and
be tested) on CPU and GPU alike. The Accelerator then sees a plain distributed run.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, broadcast
from torch import nn

from losia_cli.config import RunConfig
from losia_cli.errors import ConfigError
from losia_cli.methods.base import Distributed


def _deepspeed_plugin(cfg: RunConfig) -> DeepSpeedPlugin:
    stage = 3 if cfg.dist.name == "zero3" else 2
    zero: dict = {"stage": stage}
    if cfg.dist.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # final/ gets whole weights
    return DeepSpeedPlugin(hf_ds_config={
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        # DeepSpeed clips inside its step; accelerate's clip_grad_norm_ is a no-op under it.
        "gradient_clipping": cfg.train.max_grad_norm or 0.0,
        "zero_optimization": zero,
        # Our AdamW, also when offloaded (DeepSpeedCPUAdam would need compiled ops).
        "zero_force_ds_cpu_optimizer": False,
        # Weights stay fp32; bf16 is the engine's own autocast.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    })


def make_accelerator(cfg: RunConfig) -> Accelerator:
    cpu = cfg.train.device == "cpu" or not torch.cuda.is_available()
    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("gloo" if cpu else "nccl")
    kwargs: dict = {
        # accelerate only turns DeepSpeed on with cpu=False; without CUDA its device is the CPU anyway.
        "cpu": cpu and not cfg.dist.deepspeed,
        "gradient_accumulation_steps": cfg.train.grad_accum,
    }
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a single process starts no process group
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=30))]
    if cfg.dist.deepspeed:
        kwargs["deepspeed_plugin"] = _deepspeed_plugin(cfg)
    return Accelerator(**kwargs)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 over all processes: one unit per decoder block (the classes the model names in
    `_no_split_modules`), then the rest. Parameters become DTensor shards, so build the optimizer after.
    The model is on its device already."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    block_names = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or []}
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ConfigError(f"dist=fsdp: {type(model).__name__} names no decoder-block class (_no_split_modules)")
    for unit in [*blocks, model]:
        for module in _minority_dtype_modules(unit):
            fully_shard(module, mesh=mesh)
        fully_shard(unit, mesh=mesh)
    return model


def _minority_dtype_modules(unit: nn.Module) -> list[nn.Module]:
    """FSDP2 all-gathers and reduces the trainable parameters of a unit in one dtype, and refuses a unit
    that mixes them (LoSiA's fp32 blocks next to the bf16 norms of `dense_extras`). The modules of `unit`
    (not yet in a unit of their own) whose trainable parameters are not in the unit's main dtype, the one
    holding most trainable elements, become units of their own first: small ones, the norms, as a rule."""
    from torch.distributed.fsdp import FSDPModule

    def own_modules(module: nn.Module):
        yield module
        for child in module.children():
            if not isinstance(child, FSDPModule):
                yield from own_modules(child)

    owned = [(m, [p for p in m.parameters(recurse=False) if p.requires_grad]) for m in own_modules(unit)]
    elements: dict[torch.dtype, int] = {}
    for _, params in owned:
        for p in params:
            elements[p.dtype] = elements.get(p.dtype, 0) + p.numel()
    if len(elements) < 2:
        return []
    main = max(elements, key=elements.get)
    return [m for m, params in owned if m is not unit and any(p.dtype != main for p in params)]


def deepspeed_optimizer(accelerator: Accelerator):
    """The ZeRO optimizer (holds the fp32 master partitions), or None when not under DeepSpeed."""
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return engine.engine.optimizer if engine is not None else None


class AcceleratorDist(Distributed):
    """What a method sees of the accelerator's processes (methods/base.py's `Distributed`)."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.world_size, self.rank = accelerator.num_processes, accelerator.process_index
        self.reduced_bytes = 0  # what the method all-reduced (LoSiA's scoring layer's m x n gradient)

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        if self.world_size > 1:
            self.reduced_bytes += tensor.numel() * tensor.element_size()
            tensor.copy_(self.accelerator.reduce(tensor, reduction="sum"))

    def broadcast_from_main(self, tensor: torch.Tensor) -> torch.Tensor:
        return broadcast(tensor, from_process=0) if self.world_size > 1 else tensor

    def params_changed(self) -> None:
        zero = deepspeed_optimizer(self.accelerator)
        if zero is not None:
            zero.refresh_fp32_params()


def count_grad_sync_bytes(model) -> dict | None:
    """Count the bytes DDP all-reduces (its buckets hold exactly the trainable gradients)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return None
    counter = {"bytes": 0}

    def counting_allreduce(process_group, bucket):
        counter["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(process_group, bucket)

    model.register_comm_hook(None, counting_allreduce)
    return counter
