"""Accelerate set-up for `dist=single|ddp|fsdp|zero2|zero3` (recipes/dist/).

Every process builds the same Accelerator from the same config; `losia train` has already relaunched
itself through `accelerate launch` (losia_cli/launch.py) when more than one process is asked for.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

from losia_cli.config import RunConfig


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
    elif cfg.dist.name == "fsdp":
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",  # one shard unit per decoder block
            reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT",
            cpu_ram_efficient_loading=False,
        )
    return Accelerator(**kwargs)


def deepspeed_optimizer(accelerator: Accelerator):
    """The ZeRO optimizer (holds the fp32 master partitions), or None when not under DeepSpeed."""
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return engine.engine.optimizer if engine is not None else None


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


def ranks_in_sync(accelerator: Accelerator, model) -> bool:
    """Every rank holds the same weights and buffers (LoSiA's R, C included): compares per-tensor
    fp64 sums across ranks, a cheap fingerprint that differs as soon as one element does."""
    if accelerator.num_processes == 1:
        return True
    sums = torch.stack([t.detach().double().sum() for t in model.state_dict().values()])
    gathered = accelerator.gather(sums.to(accelerator.device)).view(accelerator.num_processes, -1)
    return bool((gathered == gathered[0]).all())
