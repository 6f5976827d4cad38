"""Distributed pieces without the CLI: FSDP2 units with mixed trainable dtypes (2 CPU processes, gloo),
the all-reduce byte count, and checkpoints loaded onto the CPU whatever device wrote them."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_losia_support import VOCAB, tiny_llama

from losia_cli.engine import checkpoint
from losia_cli.engine.distributed import AcceleratorDist, count_grad_sync_bytes, shard_model
from losia_cli.methods import TrainContext, WarmupCosine
from losia_cli.methods.base import Distributed
from losia_cli.methods.losia import LosiaConfig, LosiaMethod


class _Gloo(Distributed):
    """Two gloo processes, as the engine's AcceleratorDist would see them."""

    world_size = 2

    def __init__(self, rank: int):
        self.rank = rank

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor)

    def broadcast_from_main(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tensor, src=0)
        return tensor


def _train_two_steps(rank: int, init_file: str, extras: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ctx = TrainContext(schedule=WarmupCosine(4), total_steps=4, dist=_Gloo(rank), sharded_weights=True)
        method = LosiaMethod(LosiaConfig(name="losia_pro", rank_factor=0.25, dense_extras=extras))
        model = shard_model(method.prepare(tiny_llama().to(torch.bfloat16).train(), ctx))
        optimizer = torch.optim.AdamW(method.param_groups(1e-3, 0.0))
        tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(rank))
        for step in range(2):
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            method.on_step(step, optimizer)
    finally:
        dist.destroy_process_group()


def test_fsdp_trains_fp32_blocks_next_to_bf16_extras(tmp_path):
    """FSDP2 refuses a unit whose trainable parameters mix dtypes (LoSiA's fp32 blocks, bf16 norms);
    shard_model gives the minority its own units. `all` puts bf16 norms next to the fp32 blocks in
    every decoder-block unit, as `norms` does, and trains the embeddings and head in the root unit."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_train_two_steps, args=(str(tmp_path / "init"), "all"), nprocs=2, join=True)


def test_grad_sync_counts_what_the_method_all_reduces(tmp_path):
    """DDP's buckets, and apart from them the scoring layer's m x n gradient the method all-reduces
    through the engine's AcceleratorDist."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 4))
        counter = count_grad_sync_bytes(model)
        model(torch.ones(2, 8)).sum().backward()
        assert counter["bytes"] == (8 * 4 + 4) * 4
    finally:
        dist.destroy_process_group()
    reduced = []
    accelerator = SimpleNamespace(num_processes=2, process_index=0,
                                  reduce=lambda t, reduction: reduced.append(t) or t * 2)
    procs = AcceleratorDist(accelerator)
    score_grad = torch.ones(16, 32)
    procs.all_reduce_sum(score_grad)
    assert len(reduced) == 1 and torch.equal(score_grad, torch.full((16, 32), 2.0))
    assert procs.reduced_bytes == 16 * 32 * 4


def test_checkpoint_files_load_onto_the_cpu(tmp_path, monkeypatch):
    """Every torch.load of a checkpoint maps to the CPU; the loaders move tensors to each rank's device."""
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    checkpoint.save_weights(model, tmp_path / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    torch.save({}, tmp_path / "method.pt")
    torch.save(checkpoint._rng_state(), tmp_path / "rng-rank0.pt")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 1, "world_size": 1}))
    real_load, maps = torch.load, []

    def spy(*args, **kwargs):
        maps.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    accelerator = SimpleNamespace(process_index=0, num_processes=1)
    method = SimpleNamespace(load_state_dict=lambda state: None)
    assert checkpoint.load(tmp_path, accelerator, model, optimizer, method)["step"] == 1
    assert maps == ["cpu"] * 3
