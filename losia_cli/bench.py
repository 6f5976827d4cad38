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
  step) + activations saved for backward (all tensors packed through `saved_tensors_hooks` in one
  forward, unique storages, parameters excluded). Device-independent and exact for what it counts;
  it omits allocator slack and transient workspaces (logits upcast, GEMM scratch).
- CUDA: `cuda_peak_allocated_bytes` / `cuda_peak_reserved_bytes` over warmup + 2 steps, measured with
  only that method's model alive (a sequential pass before the timed phase when interleaving).
- CPU: `rss_peak_delta_bytes`: ru_maxrss growth of a spawned child process that builds the model and
  runs warmup + 2 steps for that method alone (ru_maxrss is a process high-water mark and cannot be
  reset, so in one process it would only show the largest method).

`--plot PNG` draws the report (step time with p95, peak memory, ratios to floor and LoRA);
`--from JSON` re-prints and re-plots a saved report without running anything.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import multiprocessing
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from losia_cli import atomic
from losia_cli.engine.records import device_name, versions
from losia_cli.methods.base import Method, TrainContext, WarmupCosine
from losia_cli.models import DTYPES

# losia_pro_delta: LoSiA-Pro in the delta form FSDP runs (W written only when a block moves), here in
# one process, to price that form against write-through.
METHODS = ["floor", "full", "lora", "dora", "pissa", "galore", "losia", "losia_pro", "losia_pro_delta"]

_LLAMA = dict(hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=4096)
# Random-weight shapes (only the shape matters for speed and memory). The two small Llamas keep an
# 8k vocabulary so the output head stays a realistic share of the compute, as it is at 7B.
SHAPES: dict[str, tuple[str, dict]] = {
    "llama_h512_l4": ("llama", dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=8, vocab_size=8192, **_LLAMA)),
    "llama_h1024_l8": ("llama", dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8,
                                     num_attention_heads=16, num_key_value_heads=16, vocab_size=8192, **_LLAMA)),
    "llama2_7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, **_LLAMA)),
    "llama2_13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, **_LLAMA)),
    "gemma_2b": ("gemma", dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                               num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=256000,
                               hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192)),
    "smollm2_135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
                                   rms_norm_eps=1e-5, max_position_embeddings=8192)),
}
LR, BETAS, EPS = 1e-5, (0.9, 0.999), 1e-8


class BenchError(ValueError):
    """A bad bench request (unknown shape or method, missing package); the message says which."""


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


def _config_cls(family: str):
    from transformers import GemmaConfig, LlamaConfig

    return {"llama": LlamaConfig, "gemma": GemmaConfig}[family]


def build_model(model: str | dict, device: str, dtype: str, seed: int) -> nn.Module:
    """A shape name (random weights), a dict {"family", **config kwargs} (tests), or a local HF dir."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if isinstance(model, dict):
        kwargs = dict(model)
        config = _config_cls(kwargs.pop("family", "llama"))(**kwargs)
    elif model in SHAPES:
        family, kwargs = SHAPES[model]
        config = _config_cls(family)(**kwargs)
    elif Path(model).expanduser().is_dir():
        return AutoModelForCausalLM.from_pretrained(
            Path(model).expanduser(), dtype=DTYPES[dtype], attn_implementation="sdpa"
        ).to(device)
    else:
        raise BenchError(f"unknown model '{model}': a local HF dir or one of {', '.join(SHAPES)}")
    with torch.device(device):  # initialise directly on the device (a 7B init on CPU takes minutes)
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], attn_implementation="sdpa")


def make_method(name: str, lora_rank: int, rank_factor: float | None, period: int | None) -> Method:
    if name == "floor":
        return FloorMethod(None)
    from losia_cli.methods import build_method

    if name == "full":
        from losia_cli.methods.full import FullConfig

        cfg = FullConfig()
    elif name in ("lora", "dora", "pissa"):
        from losia_cli.methods.peft_methods import PeftMethodConfig

        cfg = PeftMethodConfig(name=name, rank=lora_rank)
    elif name == "galore":
        from losia_cli.methods.galore import GaloreConfig

        cfg = GaloreConfig(rank=lora_rank)
        try:
            import galore_torch  # noqa: F401
        except ImportError:
            raise BenchError("method galore needs the package galore-torch: pip install galore-torch") from None
    elif name in ("losia", "losia_pro", "losia_pro_delta"):
        from losia_cli.methods.losia import LosiaConfig

        # Parameter parity with LoRA (method doc 3.2): without a rank factor, size each block like LoRA-r.
        extra = {"rank_factor": rank_factor} if rank_factor is not None else {"lora_rank": lora_rank}
        if period is not None:
            extra["period"] = period
        cfg = LosiaConfig(name=name.removesuffix("_delta"), **extra)
    else:
        raise BenchError(f"unknown method '{name}'; known: {', '.join(METHODS)}")
    return build_method(cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from an optimizer-state value."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return 0
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):  # e.g. GaLore's projector object holding its orthogonal matrix
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


@dataclass
class Batch:
    input_ids: torch.Tensor
    n_targets: int


class Runner:
    """One method on its own model: the engine's step, timed."""

    def __init__(self, name: str, spec: dict, batch: Batch):
        self.name = name
        self.device = torch.device(spec["device"])
        total = spec["warmup"] + spec["steps"]
        ctx = TrainContext(schedule=WarmupCosine(total_steps=total), total_steps=total, seed=spec["seed"],
                           sharded_weights=name.endswith("_delta"))
        self.method = make_method(name, spec["lora_rank"], spec["rank_factor"], spec.get("period"))
        model = build_model(spec["model"], spec["device"], spec["dtype"], spec["seed"])
        self.model = self.method.prepare(model, ctx)
        if spec["activation_checkpointing"]:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.groups = self.method.param_groups(LR, 0.0)
        for group in self.groups:
            group.setdefault("base_lr", group["lr"])
        make = getattr(self.method, "make_optimizer", None)
        if not self.groups:
            self.optimizer = None
        elif make is not None:
            self.optimizer = make(self.groups, LR, BETAS, EPS)
        else:
            self.optimizer = torch.optim.AdamW(self.groups, lr=LR, betas=BETAS, eps=EPS)
        self.batch = batch
        self.step_index = 0
        self.times: list[float] = []
        self.memory: dict[str, int] = {}

    def step(self, account: bool = False) -> float:
        from losia_cli.engine.loop import token_loss_sum

        ids = self.batch.input_ids
        t0 = time.perf_counter()
        if self.optimizer is not None:
            factors = self.method.lr_factors(self.step_index, len(self.groups))
            for group, factor in zip(self.optimizer.param_groups, factors):
                group["lr"] = group["base_lr"] * factor
        if account:
            loss = self._accounted_forward(ids)
        else:
            loss = token_loss_sum(self.model(input_ids=ids).logits, ids) / self.batch.n_targets
        loss.backward()
        if account:
            self.memory["grad_bytes"] = sum(
                p.grad.numel() * p.grad.element_size() for p in self.model.parameters() if p.grad is not None
            )
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.method.on_step(self.step_index, self.optimizer)
        _sync(self.device)
        elapsed = time.perf_counter() - t0
        self.step_index += 1
        if account:
            self.memory["optimizer_state_bytes"] = (
                0 if self.optimizer is None else _tensor_bytes(list(self.optimizer.state.values()), set())
            )
            self.memory["param_bytes"] = sum(p.numel() * p.element_size() for p in self.model.parameters())
            self.memory["buffer_bytes"] = sum(b.numel() * b.element_size() for b in self.model.buffers())
            self.memory["accounted_bytes"] = sum(
                self.memory[k] for k in ("param_bytes", "buffer_bytes", "grad_bytes",
                                         "optimizer_state_bytes", "activation_bytes")
            )
        return elapsed

    def _accounted_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Forward + loss while summing the unique storages autograd saves for backward."""
        from losia_cli.engine.loop import token_loss_sum

        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and t.device.type != "meta":
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = token_loss_sum(self.model(input_ids=ids).logits, ids) / self.batch.n_targets
        self.memory["activation_bytes"] = sum(seen.values())
        return loss

    def close(self) -> None:
        self.model = self.optimizer = self.groups = self.method = None


def make_batch(spec: dict, vocab_size: int) -> Batch:
    gen = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, vocab_size, (spec["batch"], spec["seq"]), generator=gen)
    return Batch(ids.to(spec["device"]), spec["batch"] * (spec["seq"] - 1))


def _vocab_size(model) -> int:
    if isinstance(model, dict):
        return model["vocab_size"]
    if model in SHAPES:
        return SHAPES[model][1]["vocab_size"]
    if not Path(model).expanduser().is_dir():
        raise BenchError(f"unknown model '{model}': a local HF dir or one of {', '.join(SHAPES)}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(model).expanduser())
    return getattr(config, "vocab_size", None) or config.get_text_config().vocab_size


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cuda_memory_pass(name: str, spec: dict, batch: Batch) -> dict:
    """Peak CUDA memory with only this method's model alive: build, warmup + 2 steps, free."""
    device = torch.device(spec["device"])
    _free(device)
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
    _free(device)
    return out


def _rss_child(name: str, spec: dict) -> int:
    """Runs in a spawned process: ru_maxrss growth from just before the model is built (bytes)."""
    torch.set_num_threads(spec["num_threads"])
    batch = make_batch(spec, _vocab_size(spec["model"]))
    make_method(name, spec["lora_rank"], spec["rank_factor"], spec.get("period"))  # imports first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner = Runner(name, spec, batch)
    for _ in range(spec["warmup"] + 2):
        runner.step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # Linux: KiB


def _rss_pass(name: str, spec: dict) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return {"rss_peak_delta_bytes": pool.apply(_rss_child, (name, spec))}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def run_bench(
    model: str | dict = "llama_h512_l4",
    methods: list[str] = ("floor", "full", "lora", "losia_pro"),
    batch: int = 4,
    seq: int = 256,
    steps: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    dtype: str = "fp32",
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

    `rss`: measure CPU peak RSS in child processes (None: yes on CPU). `period`: LoSiA's T override.
    `notes`: free text kept in the report (machine conditions). `progress(msg)`: optional status callback.
    """
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if dtype not in DTYPES:
        raise BenchError(f"dtype must be one of {', '.join(DTYPES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("device=cuda but no CUDA device is visible")
    if steps < 1 or warmup < 1:
        raise BenchError("steps and warmup must be >= 1 (the first warmup step also does the accounting)")
    say = progress or (lambda msg: None)
    spec = dict(model=model, batch=batch, seq=seq, steps=steps, warmup=warmup, device=device, dtype=dtype,
                activation_checkpointing=activation_checkpointing, lora_rank=lora_rank,
                rank_factor=rank_factor, seed=seed, period=period, num_threads=torch.get_num_threads())
    dev = torch.device(device)
    if rss is None:
        rss = dev.type == "cpu"
    data = make_batch(spec, _vocab_size(model))
    results: dict[str, dict] = {m: {} for m in methods}

    if rss and dev.type == "cpu":
        for name in methods:
            say(f"peak RSS of {name} (child process)")
            results[name].update(_rss_pass(name, spec))
    if dev.type == "cuda" and interleave:
        for name in methods:
            say(f"peak CUDA memory of {name}")
            results[name].update(_cuda_memory_pass(name, spec, data))

    def start(name: str) -> Runner:
        say(f"building {name}")
        if dev.type == "cuda" and not interleave:
            _free(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        runner = Runner(name, spec, data)
        runner.step(account=True)
        for _ in range(warmup - 1):
            runner.step()
        return runner

    def finish(runner: Runner) -> None:
        out = results[runner.name]
        out.update(runner.memory)
        out.update(runner.method.describe())
        out["method"] = runner.name
        if dev.type == "cuda" and not interleave:
            out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
            out["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
        # Measured state (what the optimizer really holds) wins over the method's estimate.
        out["optimizer_state_bytes_estimate"] = out.pop("optimizer_state_bytes", None)
        out["optimizer_state_bytes"] = runner.memory["optimizer_state_bytes"]
        times = runner.times
        out.update(step_times_s=times, median_step_s=statistics.median(times), p95_step_s=_percentile(times, 0.95),
                   mean_step_s=statistics.fmean(times))
        out["tokens_per_s"] = batch * seq / out["median_step_s"]

    if interleave:
        runners = [start(name) for name in methods]
        say(f"timing {steps} interleaved rounds")
        for _ in range(steps):
            for runner in runners:
                runner.times.append(runner.step())
        for runner in runners:
            finish(runner)
            runner.close()
    else:
        for name in methods:
            runner = start(name)
            say(f"timing {name}")
            for _ in range(steps):
                runner.times.append(runner.step())
            finish(runner)
            runner.close()
            del runner
            _free(dev)

    memory_key = next(
        (k for k in ("cuda_peak_allocated_bytes", "rss_peak_delta_bytes") if k in results[methods[0]]),
        "accounted_bytes",
    )
    for out in results.values():
        out["peak_memory_bytes"] = out[memory_key]
    for out in results.values():
        for ref in ("floor", "lora"):
            if ref in results:
                out[f"step_time_vs_{ref}"] = out["median_step_s"] / results[ref]["median_step_s"]
                out[f"memory_vs_{ref}"] = out["peak_memory_bytes"] / results[ref]["peak_memory_bytes"]
                out[f"accounted_vs_{ref}"] = out["accounted_bytes"] / results[ref]["accounted_bytes"]

    return {
        "meta": {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "device": device_name(dev),
            "versions": versions(),
            "peak_memory_metric": memory_key,
            "notes": notes,
            "config": {k: v for k, v in spec.items()} | {"methods": methods, "interleave": interleave,
                                                            "lr": LR, "betas": list(BETAS), "eps": EPS},
        },
        "results": results,
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}G" if n >= 2**30 else f"{n / 2**20:.1f}M"


def print_table(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    meta, results = report["meta"], report["results"]
    cfg = meta["config"]
    model = cfg["model"] if isinstance(cfg["model"], str) else "custom"
    table = Table(title=f"{model} B{cfg['batch']}xT{cfg['seq']} {cfg['dtype']} on {meta['device']} "
                        f"(peak = {meta['peak_memory_metric']})")
    for column in ("method", "trainable", "median s", "p95 s", "tok/s", "vs floor", "vs lora",
                   "peak", "accounted", "opt state", "mem vs lora"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, r in results.items():
        table.add_row(
            name, f"{r['trainable_params']:,}", f"{r['median_step_s']:.4f}", f"{r['p95_step_s']:.4f}",
            f"{r['tokens_per_s']:.0f}", f"{r.get('step_time_vs_floor', float('nan')):.2f}x",
            f"{r.get('step_time_vs_lora', float('nan')):.2f}x", _gib(r["peak_memory_bytes"]),
            _gib(r["accounted_bytes"]), _gib(r["optimizer_state_bytes"]),
            f"{r.get('memory_vs_lora', float('nan')):.2f}x",
        )
    console.print(table)


_MEMORY_LABELS = {
    "rss_peak_delta_bytes": "peak RSS growth (child process)",
    "cuda_peak_allocated_bytes": "CUDA peak allocated",
    "accounted_bytes": "accounted bytes",
}


def _bar_color(name: str) -> str:
    # LoSiA methods stand out; the floor (a bound, not a method) is grey.
    if name.startswith("losia_pro"):
        return "tab:red"
    return {"floor": "0.65", "losia": "tab:orange"}.get(name, "tab:blue")


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"  # 3 significant digits, never 1.14e+03


def _bar_label(value: str, r: dict, prefix: str) -> str:
    refs = [ref for ref in ("floor", "lora") if f"{prefix}_vs_{ref}" in r]
    ratios = ", ".join(f"{r[f'{prefix}_vs_{ref}']:.2f}x {ref}" for ref in refs)
    return f"  {value}" + (f" | {ratios}" if ratios else "")


def plot_report(report: dict, path: str | Path) -> Path:
    """PNG of a bench report: median step time (whisker to p95) and peak memory per method, each bar
    labelled with its ratios to floor and LoRA. Written atomically; matplotlib is imported only here."""
    from matplotlib.figure import Figure  # object API: no pyplot state, no GUI backend (Agg)

    meta, results = report["meta"], report["results"]
    cfg = meta["config"]
    names = list(results)
    rows = [results[n] for n in names]
    y = list(range(len(names)))[::-1]  # first method on top
    colors = [_bar_color(n) for n in names]
    fig = Figure(figsize=(12, 1.6 + 0.42 * len(names)), dpi=110, layout="constrained")
    ax_t, ax_m = fig.subplots(1, 2, sharey=True)

    median = [r["median_step_s"] for r in rows]
    p95 = [max(r["p95_step_s"], r["median_step_s"]) for r in rows]
    ax_t.barh(y, median, color=colors, xerr=[[0] * len(rows), [b - a for a, b in zip(median, p95)]],
              error_kw=dict(ecolor="0.25", capsize=3, lw=1))
    for yi, r, end in zip(y, rows, p95):
        ax_t.text(end, yi, _bar_label(f"{_num(r['median_step_s'])} s", r, "step_time"), va="center", fontsize=8)
    ax_t.set_xlim(0, max(p95) * 1.9)  # room for the labels right of the whiskers
    ax_t.set_title("step time: median, whisker to p95", fontsize=10)
    ax_t.set_xlabel("seconds per optimizer step")

    unit, scale = ("GiB", 2**30) if max(r["peak_memory_bytes"] for r in rows) >= 4 * 2**30 else ("MiB", 2**20)
    memory = [r["peak_memory_bytes"] / scale for r in rows]
    ax_m.barh(y, memory, color=colors)
    for yi, r, end in zip(y, rows, memory):
        ax_m.text(end, yi, _bar_label(f"{_num(end)} {unit}", r, "memory"), va="center", fontsize=8)
    ax_m.set_xlim(0, max(memory) * 1.9)
    ax_m.set_title(f"peak memory: {_MEMORY_LABELS.get(meta['peak_memory_metric'], meta['peak_memory_metric'])}",
                   fontsize=10)
    ax_m.set_xlabel(unit)

    ax_t.set_yticks(y, names)
    for ax in (ax_t, ax_m):
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    model = cfg["model"] if isinstance(cfg["model"], str) else "custom shape"
    model = Path(model).name if "/" in model else model
    checkpointing = ", activation checkpointing" if cfg.get("activation_checkpointing") else ""
    mode = "interleaved" if cfg.get("interleave", True) else "sequential"
    fig.suptitle(f"{model}: B{cfg['batch']}xT{cfg['seq']}, {cfg['dtype']}{checkpointing}, {meta['device']} "
                 f"({cfg['steps']} {mode} steps, LoRA rank {cfg['lora_rank']})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.file(path) as tmp:  # a crash never leaves a truncated PNG
        fig.savefig(tmp, format="png")
    return path


def load_report(path: str | Path) -> dict:
    """A results JSON written by `losia bench` (to re-plot or re-print it)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"--from: no such file {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise BenchError(f"--from: {path} is not readable JSON ({e})") from None
    if not isinstance(report, dict) or not {"meta", "results"} <= set(report):
        raise BenchError(f"--from: {path} is not a `losia bench` result (no meta/results)")
    return report


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `losia bench`; each also accepts the Hydra-like `key=value` form (see bench_command)."""
    parser.add_argument("--model", default="llama_h512_l4", help=f"shape ({', '.join(SHAPES)}) or a local HF dir")
    parser.add_argument("--methods", default="floor,full,lora,losia_pro",
                        help=f"comma list or [a,b]; known: {', '.join(METHODS)}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per method first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA/DoRA/PiSSA/GaLore rank; LoSiA parity rank")
    parser.add_argument("--rank-factor", type=float, default=None, help="LoSiA p (default: parity with --lora-rank)")
    parser.add_argument("--period", type=int, default=None, help="LoSiA time-slot length T (default: the method's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-interleave", action="store_true",
                        help="time methods one after another, freeing each model (for shapes that don't fit together)")
    parser.add_argument("--no-rss", action="store_true", help="CPU: skip the child-process peak-RSS pass")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--note", default=None, help="free text stored as meta.notes (e.g. machine load)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>_<model>.json)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also write a bar chart of the results")
    parser.add_argument("--from", dest="from_json", default=None, metavar="JSON",
                        help="run nothing: re-print and plot an existing results JSON (--plot default: JSON.png)")
    parser.add_argument("overrides", nargs="*", help="key=value forms, e.g. model=llama2_7b methods=[lora,losia_pro]")


def _apply_overrides(args: argparse.Namespace) -> argparse.Namespace:
    aliases = {"activation_checkpointing": "activation_checkpointing", "lora_rank": "lora_rank"}
    for item in args.overrides or []:
        if "=" not in item:
            raise BenchError(f"expected key=value, got '{item}'")
        key, value = item.split("=", 1)
        key = aliases.get(key, key.replace("-", "_"))
        if key not in vars(args) or key == "overrides":
            raise BenchError(f"unknown bench option '{key}'")
        current = getattr(args, key)
        if isinstance(current, bool) or key in ("no_interleave", "no_rss", "activation_checkpointing"):
            value = value.lower() in ("1", "true", "yes", "on")
        elif key in ("batch", "seq", "steps", "warmup", "lora_rank", "seed", "period", "threads"):
            value = int(value)
        elif key == "rank_factor":
            value = None if value.lower() in ("null", "none") else float(value)
        setattr(args, key, value)
    return args


def bench_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=140)  # logs: don't squeeze the table
    args = _apply_overrides(args)
    if args.from_json:
        report = load_report(args.from_json)
        print_table(report, console)
        out = plot_report(report, args.plot or Path(args.from_json).with_suffix(".png"))
        console.print(f"wrote {out}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.strip("[]").split(",") if m.strip()]
    report = run_bench(
        model=args.model, methods=methods, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
        device=args.device, dtype=args.dtype, activation_checkpointing=args.activation_checkpointing,
        lora_rank=args.lora_rank, rank_factor=args.rank_factor, seed=args.seed, interleave=not args.no_interleave,
        rss=False if args.no_rss else None, period=args.period, notes=args.note,
        progress=lambda msg: console.print(f"[dim]{msg}[/]"),
    )
    shape = Path(args.model).name if Path(args.model).expanduser().is_dir() else args.model
    out = Path(args.out or f"benchmarks/results/{torch.device(args.device).type}_{shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, report)
    print_table(report, console)
    console.print(f"wrote {out}")
    if args.plot:
        console.print(f"wrote {plot_report(report, args.plot)}")
    return 0


if __name__ == "__main__":  # python -m losia_cli.bench [args]: the same as `losia bench`
    parser = argparse.ArgumentParser(prog="losia bench", description=__doc__.split("\n")[0])
    add_bench_arguments(parser)
    try:
        raise SystemExit(bench_command(parser.parse_args()))
    except BenchError as e:
        parser.exit(2, f"losia bench: error: {e}\n")
