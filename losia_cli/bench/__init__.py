"""`losia bench`: step latency and memory of fine-tuning methods, side by side, on one model shape.

A step is exactly what the engine does per optimizer step (grad_accum 1): set the group LRs from
`method.lr_factors`, forward, token cross-entropy, backward, `optimizer.step()`, `zero_grad`,
`method.on_step(...)` (LoSiA's scoring / re-localization, GaLore's SVD inside its optimizer), and a
device sync. The method is used through the same interface as the engine: prepare -> param_groups ->
`make_optimizer` or AdamW -> lr_factors -> on_step.

Protocol (benchmarks/README.md): one process; every method gets its own model (same shape, same
random weights, same random token batch), built once and kept; after `warmup` steps per method the
measured steps run round-robin, one step per method per round, so drift of the machine (clock, other
load, thermal) hits every method alike. `--no-interleave` times one method after another instead and
frees each model before the next is built (for shapes where all models do not fit at once).

Memory, per method:
- `accounted_bytes`: parameters + buffers + gradients (after backward) + optimizer state (after the
  step) + LoSiA's fp32 scorer buffers + activations saved for backward (all tensors packed through
  `saved_tensors_hooks` in one forward, unique storages, parameters excluded). Device-independent and exact for what it counts;
  it omits allocator slack and transient workspaces (logits upcast, GEMM scratch).
- CUDA: `cuda_peak_allocated_bytes` / `cuda_peak_reserved_bytes` over warmup + 2 steps, measured with
  only that method's model alive (a sequential pass before the timed phase when interleaving).
- CPU: `rss_peak_delta_bytes`: peak-RSS growth (engine/memory.py's definition of peak memory) of a
  spawned child process that builds the model and runs warmup + 2 steps for that method alone (a
  fresh process per method, so no allocator state of another method hides its growth).

Time per part of the step (`part_times_s`, printed under the main table): forward (with the loss),
backward, optimizer (clip, step, zero_grad), and `on_step`: LoSiA's scorer update, write-through,
relocalization, the rest (method_other), each on the device's clock (methods/base.py DeviceTimer).

`--plot PNG` draws the report (step time with p95, peak memory, ratios to floor and LoRA);
`--from JSON` re-prints and re-plots a saved report without running anything.
"""

from __future__ import annotations

import datetime as _dt
import statistics
import sys

import torch

from losia_cli.bench.memory import cuda_memory_pass, free, rss_pass
from losia_cli.bench.meta import cost_table, markdown_table
from losia_cli.bench.plot import load_report, plot_report, timing_table
from losia_cli.bench.runner import BETAS, EPS, LR, METHODS, Runner
from losia_cli.bench.shapes import SHAPES, make_batch, vocab_size
from losia_cli.engine.records import device_name, model_flops_utilisation, percentile
from losia_cli.provenance import versions
from losia_cli.errors import BenchError
from losia_cli.models import DTYPES

__all__ = ["BenchError", "METHODS", "SHAPES", "load_report", "markdown_table", "plot_report", "timing_table",
           "run_bench"]


def run_bench(
    model: str | dict = "llama_h512_l4",
    methods: list[str] = ("floor", "full", "lora", "losia_pro"),
    batch: int = 4,
    seq: int = 256,
    steps: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    dtype: str | None = None,
    activation_checkpointing: bool = False,
    lora_rank: int = 8,
    rank_factor: float | None = None,
    seed: int = 0,
    interleave: bool = True,
    rss: bool | None = None,
    period: int | None = None,
    notes: str | None = None,
    progress=None,
) -> dict:
    """Time and measure `methods` on one shape; returns the JSON-able report (see module doc).

    `device=meta`: FLOPs and bytes from the real shapes, nothing timed (bench/meta.py). `dtype`: default
    bf16 on cuda and meta, fp32 on cpu. `rss`: measure CPU peak RSS in child processes (None: yes on
    CPU). `period`: LoSiA's T override.
    `notes`: free text kept in the report (machine conditions). `progress(msg)`: optional status callback.
    """
    methods = list(dict.fromkeys(methods))
    dtype = dtype or ("fp32" if device == "cpu" else "bf16")  # bf16 tensor cores on a GPU (and its cost on meta)
    _check(methods, device, dtype, steps, warmup)
    say = progress or (lambda msg: None)
    spec = dict(model=model, batch=batch, seq=seq, steps=steps, warmup=warmup, device=device, dtype=dtype,
                activation_checkpointing=activation_checkpointing, lora_rank=lora_rank,
                rank_factor=rank_factor, seed=seed, period=period, num_threads=torch.get_num_threads())
    if device == "meta":
        say("counting on the meta device")
        results, memory_key = cost_table(spec, methods), "accounted_bytes"
    else:
        results = _time_methods(methods, spec, interleave, rss, say)
        memory_key = _add_ratios(results, methods[0])
    return {
        "meta": {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "device": "meta" if device == "meta" else device_name(torch.device(device)),
            "versions": versions(),
            "peak_memory_metric": memory_key,
            "notes": notes,
            "config": {k: v for k, v in spec.items()} | {"methods": methods, "interleave": interleave,
                                                            "lr": LR, "betas": list(BETAS), "eps": EPS},
        },
        "results": results,
    }


def _time_methods(methods: list[str], spec: dict, interleave: bool, rss: bool | None, say) -> dict[str, dict]:
    """Each method's step times and memory on a real device (see the module doc)."""
    dev = torch.device(spec["device"])
    tokens = spec["batch"] * spec["seq"]
    data = make_batch(spec, vocab_size(spec["model"]))
    results: dict[str, dict] = {m: {} for m in methods}
    if rss is None:
        rss = dev.type == "cpu"
    if rss and dev.type == "cpu":
        for name in methods:
            say(f"peak RSS of {name} (child process)")
            results[name].update(rss_pass(name, spec))
    if dev.type == "cuda" and interleave:
        for name in methods:
            say(f"peak CUDA memory of {name}")
            results[name].update(cuda_memory_pass(name, spec, data))
    if interleave:
        runners = [_start(name, spec, data, say, fresh_peak=False) for name in methods]
        say(f"timing {spec['steps']} interleaved rounds")
        for _ in range(spec["steps"]):
            for runner in runners:
                runner.times.append(runner.step())
        for runner in runners:
            _finish(runner, results[runner.name], tokens, cuda_peak=False)
    else:
        for name in methods:
            runner = _start(name, spec, data, say, fresh_peak=dev.type == "cuda")
            say(f"timing {name}")
            for _ in range(spec["steps"]):
                runner.times.append(runner.step())
            _finish(runner, results[name], tokens, cuda_peak=dev.type == "cuda")
            del runner
            free(dev)
    return results


def _check(methods: list[str], device: str, dtype: str, steps: int, warmup: int) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if dtype not in DTYPES:
        raise BenchError(f"dtype must be one of {', '.join(DTYPES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("device=cuda but no CUDA device is visible")
    if steps < 1 or warmup < 1:
        raise BenchError("steps and warmup must be >= 1 (the first warmup step also does the accounting)")


def _start(name: str, spec: dict, data, say, fresh_peak: bool) -> Runner:
    """A built runner past its warmup steps, the first of which does the memory accounting."""
    say(f"building {name}")
    if fresh_peak:  # sequential on CUDA: this method's peak, with the previous model freed
        free(torch.device(spec["device"]))
        torch.cuda.reset_peak_memory_stats(spec["device"])
    runner = Runner(name, spec, data)
    runner.step(account=True)
    for _ in range(spec["warmup"] - 1):
        runner.step()
    runner.start_parts()
    return runner


def _finish(runner: Runner, out: dict, tokens: int, cuda_peak: bool) -> None:
    """Fill the method's results from its runner, then free the runner's model."""
    out.update(runner.memory)
    out.update(runner.method.describe())
    out["method"] = runner.name
    if cuda_peak:
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(runner.device)
        out["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(runner.device)
    # Measured state (what the optimizer really holds) wins over the method's estimate.
    out["optimizer_state_bytes_estimate"] = out.pop("optimizer_state_bytes", None)
    out["optimizer_state_bytes"] = runner.memory["optimizer_state_bytes"]
    times = runner.times
    out.update(step_times_s=times, median_step_s=statistics.median(times), p95_step_s=percentile(times, 95),
               mean_step_s=statistics.fmean(times))
    out["tokens_per_s"] = tokens / out["median_step_s"]
    out["part_times_s"] = runner.part_times()
    out["mfu"] = model_flops_utilisation(runner.device, out["total_params"], out["tokens_per_s"], world=1)
    runner.close()


def _add_ratios(results: dict[str, dict], first: str) -> str:
    """Peak memory and the ratios to floor and LoRA of every method; the peak memory metric used."""
    memory_key = next(
        (k for k in ("cuda_peak_allocated_bytes", "rss_peak_delta_bytes") if k in results[first]), "accounted_bytes"
    )
    for out in results.values():
        out["peak_memory_bytes"] = out[memory_key]
    for out in results.values():
        for ref in ("floor", "lora"):
            if ref in results:
                out[f"step_time_vs_{ref}"] = out["median_step_s"] / results[ref]["median_step_s"]
                out[f"memory_vs_{ref}"] = out["peak_memory_bytes"] / results[ref]["peak_memory_bytes"]
                out[f"accounted_vs_{ref}"] = out["accounted_bytes"] / results[ref]["accounted_bytes"]
    return memory_key
