"""A bench report as a Markdown table and a bar chart (matplotlib), and a saved report read back."""

from __future__ import annotations

import json
from pathlib import Path

from losia_cli import atomic
from losia_cli.errors import BenchError


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}G" if n >= 2**30 else f"{n / 2**20:.1f}M"


def markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: the header, its rule, one line per row of cells."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def timing_table(report: dict) -> str:
    """The measured report as a Markdown table under a title line (plain text: readable in a job log)."""
    meta, results = report["meta"], report["results"]
    cfg = meta["config"]
    model = cfg["model"] if isinstance(cfg["model"], str) else "custom"
    head = ["method", "trainable", "median s", "p95 s", "tok/s", "MFU", "vs floor", "vs lora", "peak", "accounted",
            "opt state", "mem vs lora"]
    rows = [
        [name, f"{r['trainable_params']:,}", f"{r['median_step_s']:.4f}", f"{r['p95_step_s']:.4f}",
         f"{r['tokens_per_s']:.0f}", "-" if r.get("mfu") is None else f"{r['mfu']:.1%}",
         f"{r.get('step_time_vs_floor', float('nan')):.2f}x",
         f"{r.get('step_time_vs_lora', float('nan')):.2f}x", _gib(r["peak_memory_bytes"]),
         _gib(r["accounted_bytes"]), _gib(r["optimizer_state_bytes"]),
         f"{r.get('memory_vs_lora', float('nan')):.2f}x"]
        for name, r in results.items()
    ]
    title = (f"{model} B{cfg['batch']}xT{cfg['seq']} {cfg['dtype']} on {meta['device']} "
             f"(peak = {meta['peak_memory_metric']})")
    return "\n".join([title, "", *markdown(head, rows), *_parts_table(results)])


PARTS = ("forward", "backward", "optimizer", "scorer", "write_through", "relocalization", "method_other")


def _parts_table(results: dict) -> list[str]:
    """Mean seconds per step of each part (runner.part_times; reports from before it have none)."""
    timed = {name: r["part_times_s"] for name, r in results.items() if r.get("part_times_s")}
    if not timed:
        return []
    rows = [[name, *[f"{parts[k]:.4f}" if k in parts else "-" for k in PARTS], f"{sum(parts.values()):.4f}"]
            for name, parts in timed.items()]
    return ["", "mean seconds per step, by part (forward includes the loss; LoSiA's score accumulation runs "
                "inside backward)", "", *markdown(["method", *PARTS, "sum"], rows)]


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
    try:
        from matplotlib.figure import Figure  # object API: no pyplot state, no GUI backend (Agg)
    except ImportError:
        raise BenchError(f"{path}: a plot needs matplotlib (pip install matplotlib); the results JSON is "
                         "written, `losia bench --from JSON --plot PNG` draws it later") from None

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


