"""Peak memory of one method measured alone, as engine/memory.py defines it: CUDA peak allocated in
this process, or on CPU the peak-RSS growth of a spawned child process. The child is not needed to
reset the peak (engine/memory.reset_peak does that) but to start each method from a fresh allocator:
memory an earlier method freed and glibc kept would be reused and hide this method's growth."""

from __future__ import annotations

import gc
import multiprocessing

import torch

from losia_cli.bench.runner import Runner, make_method
from losia_cli.bench.shapes import Batch, make_batch, vocab_size
from losia_cli.engine import memory

def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cuda_memory_pass(name: str, spec: dict, batch: Batch) -> dict:
    """Peak CUDA memory with only this method's model alive: build, warmup + 2 steps, free."""
    device = torch.device(spec["device"])
    free(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    runner = Runner(name, spec, batch)
    for _ in range(spec["warmup"] + 2):
        runner.step()
    out = {
        "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(device) - base,
        "cuda_peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
    }
    runner.close()
    del runner
    free(device)
    return out


def _rss_child(name: str, spec: dict) -> int:
    """Runs in a spawned process: peak RSS growth from just before the model is built (bytes)."""
    torch.set_num_threads(spec["num_threads"])
    batch = make_batch(spec, vocab_size(spec["model"]))
    make_method(name, spec["lora_rank"], spec["rank_factor"], spec.get("period"))  # imports first
    cpu = torch.device("cpu")
    memory.reset_peak(cpu)  # the imports' own transient peak is not this method's
    before = memory.current(cpu)
    runner = Runner(name, spec, batch)
    for _ in range(spec["warmup"] + 2):
        runner.step()
    return memory.peak(cpu) - before


def rss_pass(name: str, spec: dict) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return {"rss_peak_delta_bytes": pool.apply(_rss_child, (name, spec))}


