"""The PNG figures of `losia report`: curves, sub-network occupancy and churn, the continual matrix."""

from __future__ import annotations

import re

import numpy as np

from losia_cli.report.runs import Run, summary

MAX_BINS = 256  # index bins per heatmap panel: ~2 screen pixels each at the page's image width
MAX_EVENT_LINES = 40  # more re-localizations than this are drawn as a rug, not as vertical lines


def _figure(width: float = 9.0, height: float = 3.6):
    # The object API with no pyplot: no global state and no GUI backend (Agg renders the PNG).
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in metrics if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def relocalization_steps(subnets: list[dict]) -> list[int]:
    return sorted({r["step"] for r in subnets if r["step"] > 0})


def _mark_events(ax, events: list[int]) -> None:
    if not events:
        return
    if len(events) <= MAX_EVENT_LINES:
        for i, s in enumerate(events):
            ax.axvline(s, color="0.55", lw=0.8, ls=":", label="re-localization" if i == 0 else None)
    else:  # a dense train of lines would hide the curve: ticks along the bottom edge instead
        ax.plot(events, [0.0] * len(events), "|", color="0.45", ms=7, transform=ax.get_xaxis_transform(),
                label=f"re-localization ({len(events)})")


def _line(ax, steps, values, **kw) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, ms=3, **kw)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are counts: no "2.5"


def _smooth(values: list[float]) -> np.ndarray:
    """Centred moving mean over ~2% of the run (narrower at the ends): unlike an EMA it does not lag."""
    half, sums = max(len(values) // 100, 2), np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(len(values))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(values))
    return (sums[hi] - sums[lo]) / (hi - lo)


def loss_figure(run: Run):
    steps, loss = _series(run.metrics, "loss")
    fig = _figure()
    ax = fig.add_subplot()
    _line(ax, steps, loss, lw=1.0 if len(steps) > 50 else 1.6, alpha=0.45 if len(steps) > 50 else 1.0,
          color="tab:blue", label="loss")
    if len(steps) > 50:
        ax.plot(steps, _smooth(loss), color="tab:blue", lw=2, label="loss (moving mean)")
    val_steps, val = _series(run.metrics, "val_loss")
    if val_steps:
        ax.plot(val_steps, val, "o-", color="tab:orange", lw=1.6, label="validation loss")
    _mark_events(ax, relocalization_steps(run.subnets))
    ax.set(xlabel="step", ylabel="loss (nats / target token)", title=f"training loss: {run.label}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return fig


def lr_figure(run: Run):
    steps, lr = _series(run.metrics, "lr")
    fig = _figure()
    ax = fig.add_subplot()
    groups = [(r["step"], r["lr_groups"]) for r in run.metrics if r.get("lr_groups")]
    if groups and len(groups[0][1]) > 1:
        per_group = np.array([g for _, g in groups if len(g) == len(groups[0][1])], dtype=float)
        group_steps = [s for s, g in groups if len(g) == len(groups[0][1])]
        for j in range(per_group.shape[1]):
            ax.plot(group_steps, per_group[:, j], lw=0.8, alpha=0.6,
                    label=f"per-group lr ({per_group.shape[1]} groups)" if j == 0 else None)
    _line(ax, steps, lr, color="black", lw=1.8, label="schedule lr")
    _mark_events(ax, relocalization_steps(run.subnets))
    ax.set(xlabel="step", ylabel="learning rate", title=f"learning rate: {run.label}")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return fig


def module_kind(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'self_attn.q_proj': one heatmap per kind."""
    kind = re.sub(r"^.*?layers\.\d+\.", "", name)
    return kind.removesuffix(".weight")


def occupancy(subnets: list[dict], end_step: int) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Per module kind and layer: the share of training steps each row / column was in the block.

    A record's block trains from its `step` until the next record of the same matrix (or the run's
    end), so the shares weight each selection by how long it was trained, not by how often it was drawn.
    """
    by_module: dict[tuple[str, int | None], list[dict]] = {}
    for r in subnets:  # an expert's matrix of a 3-D expert parameter is a matrix of its own
        by_module.setdefault((r["module"], r.get("expert")), []).append(r)
    out: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for (name, expert), records in by_module.items():
        records.sort(key=lambda r: r["step"])  # stable: a later line at the same step replaces an earlier
        m, n = records[-1]["shape"]
        rows, cols = np.zeros(m), np.zeros(n)
        stops = [r["step"] for r in records[1:]] + [max(end_step, records[-1]["step"])]
        total = stops[-1] - records[0]["step"]
        for r, stop in zip(records, stops):
            weight = stop - r["step"] if total > 0 else float(r is records[-1])
            rows[r["rows"]] += weight
            cols[r["cols"]] += weight
        total = max(total, 1)
        kind = module_kind(name) if expert is None else f"{module_kind(name)}.{expert}"
        out.setdefault(kind, {})[records[-1].get("layer", 0)] = (rows / total, cols / total)
    return out


def _binned(values: np.ndarray) -> np.ndarray:
    size = -(-len(values) // MAX_BINS)
    if size == 1:
        return values
    padded = np.full(size * -(-len(values) // size), np.nan)
    padded[: len(values)] = values
    return np.nanmean(padded.reshape(-1, size), axis=1)


def subnet_figure(kind: str, layers: dict[int, tuple[np.ndarray, np.ndarray]], label: str):
    order = sorted(layers)
    fig = _figure(10.0, 1.4 + 0.2 * len(order))
    axes = fig.subplots(1, 2, sharey=True)
    image = None
    for panel, (ax, what) in enumerate(zip(axes, ("rows (output features)", "columns (input features)"))):
        binned = [_binned(layers[layer][panel]) for layer in order]
        dim = max(len(layers[layer][panel]) for layer in order)
        grid = np.full((len(order), max(len(b) for b in binned)), np.nan)
        for i, values in enumerate(binned):
            grid[i, : len(values)] = values
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1,
                          extent=(0, dim, len(order) - 0.5, -0.5))
        bins = -(-dim // MAX_BINS)
        ax.set_xlabel(f"{what} index" + (f", mean of {bins} per cell" if bins > 1 else ""))
        ax.set_yticks(range(len(order)), [str(l) for l in order], fontsize=7 if len(order) > 16 else 9)
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes), label="share of steps in the block", shrink=0.9)
    fig.suptitle(f"{kind}: where the trained sub-network sat — {label}", fontsize=10)
    return fig


def churn_figure(run: Run):
    relocs = [r for r in run.subnets if r["step"] > 0]
    fig = _figure()
    ax = fig.add_subplot()
    steps = np.array([r["step"] for r in relocs], dtype=float)
    overlap = np.array([r.get("overlap_prev", np.nan) for r in relocs], dtype=float)
    layers = np.array([r.get("layer", 0) for r in relocs])
    # Small horizontal jitter keeps the matrices re-localized at the same step from hiding each other.
    jitter = (np.random.default_rng(0).random(len(steps)) - 0.5) * 0.3
    dense = len(relocs) > 1000
    points = ax.scatter(steps + jitter, overlap, c=layers, cmap="viridis", s=4 if dense else 10,
                        alpha=0.35 if dense else 0.7, linewidths=0)
    means = sorted({s: np.nanmean(overlap[steps == s]) for s in set(steps.tolist())}.items())
    _line(ax, [s for s, _ in means], [v for _, v in means], color="black", lw=1.4, label="mean over matrices")
    fig.colorbar(points, ax=ax, label="layer")
    ax.set(xlabel="step", ylabel="overlap with previous block", ylim=(-0.03, 1.03),
           title=f"sub-network churn: {len(relocs)} re-localizations, mean overlap "
                 f"{np.nanmean(overlap):.2f} (1 = unchanged)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def _unit(values: list[float]) -> tuple[float, str]:
    return (2**30, "GiB") if max(values, default=0) >= 2**30 else (2**20, "MiB")


def curves_figure(runs: list[Run], key: str, title: str, ylabel: str, events: list[int] = ()):
    """One curve per run; with one run, reference lines (p50, events) are added."""
    fig = _figure()
    ax = fig.add_subplot()
    scale, unit = 1.0, ""
    if key == "peak_mem_bytes":
        scale, unit = _unit([v for run in runs for v in _series(run.metrics, key)[1]])
    for run in runs:
        steps, values = _series(run.metrics, key)
        _line(ax, steps, [v / scale for v in values], lw=1.4, label=run.label)
    if len(runs) == 1 and key == "step_time_s" and (p50 := summary(runs[0])["p50"]) is not None:
        ax.axhline(p50, color="tab:red", lw=1, ls="--", label=f"p50 {p50:.3g} s")
    _mark_events(ax, list(events))
    ax.set(xlabel="step", ylabel=ylabel.format(unit=unit), title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > 1:  # one run's name alone is already in the title
        ax.legend(loc="best", fontsize=8)
    return fig


def continual_figure(cont: dict, label: str):
    tasks = cont.get("tasks", [])
    rows = [("initial", cont["initial"])] if cont.get("initial") else []
    for i, (stage, values) in enumerate(zip(cont.get("stages", []), cont.get("matrix", [])), 1):
        rows.append((f"after {i}: {stage.get('name', i)}", values))
    grid = np.array([[np.nan if v is None else v for v in values] for _, values in rows], dtype=float)
    finite = grid[np.isfinite(grid)]
    bounded = finite.size and finite.min() >= 0 and finite.max() <= 1
    fig = _figure(max(5.0, 1.6 + 1.5 * len(tasks)), 1.2 + 0.55 * len(rows))
    ax = fig.add_subplot()
    from matplotlib import colormaps

    image = ax.imshow(grid, cmap=colormaps["viridis"].with_extremes(bad="0.9"), aspect="auto",
                      vmin=0 if bounded else None, vmax=1 if bounded else None)
    norm = image.norm
    for (i, j), v in np.ndenumerate(grid):
        dark = np.isfinite(v) and norm(v) < 0.6
        ax.text(j, i, "–" if not np.isfinite(v) else f"{v:.3f}", ha="center", va="center", fontsize=9,
                color="white" if dark else "black")
    metrics = cont.get("metrics", {})
    ax.set_xticks(range(len(tasks)), [f"{t}\n({metrics.get(t, '?')})" for t in tasks], fontsize=8)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.set_xlabel("task evaluated")
    bwt, fgt = cont.get("backward_transfer"), cont.get("forgetting")
    ax.set_title(f"continual: {label} — BWT {_fmt(bwt, '+.3f')}, forgetting {_fmt(fgt, '.3f')}", fontsize=10)
    fig.colorbar(image, ax=ax, label="score")
    return fig


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def figures(runs: list[Run], single: bool) -> list[tuple[str, str, object]]:
    """(file name, caption, Figure) for everything that can be drawn from these runs."""
    out: list[tuple[str, str, object]] = []
    curve_runs = [r for r in runs if r.metrics]
    if single and curve_runs:
        run = curve_runs[0]
        events = relocalization_steps(run.subnets)
        out += [
            ("loss.png", "Training loss per step (and validation loss, when the run has a validation set); "
                         "dotted lines mark sub-network re-localizations.", loss_figure(run)),
            ("lr.png", "Learning rate: the run's schedule (black) and each optimizer group's lr (LoSiA "
                       "re-warms a slot's lr after it re-localizes).", lr_figure(run)),
            ("step_time.png", "Wall time per optimizer step (dashed: p50 without the warm-up step); "
                              "re-localization steps are marked.",
             curves_figure([run], "step_time_s", f"step time: {run.label}", "seconds / step", events)),
            ("memory.png", "Peak memory as logged per step (CUDA allocated on GPU, process RSS on CPU).",
             curves_figure([run], "peak_mem_bytes", f"peak memory: {run.label}", "peak memory ({unit})")),
        ]
        if _series(run.metrics, "pref_accuracy")[0]:  # a preference objective (train.objective)
            out.append(("pref_accuracy.png", "Preference accuracy (share of pairs whose chosen side has "
                                             "the higher implicit reward) per logged step.",
                        curves_figure([run], "pref_accuracy", f"preference accuracy: {run.label}", "accuracy")))
        if _series(run.metrics, "grad_norm")[0]:  # logged when clipping is on
            out.append(("grad_norm.png", "Gradient norm before clipping, per step; re-localizations are marked.",
                        curves_figure([run], "grad_norm", f"gradient norm: {run.label}", "L2 norm", events)))
        if run.subnets:
            end = max(run.metrics[-1]["step"], (run.report or {}).get("total_steps") or 0)
            for kind, layers in sorted(occupancy(run.subnets, end).items()):
                name = "subnet_" + re.sub(r"[^A-Za-z0-9]+", "_", kind) + ".png"
                out.append((name, f"{kind}: share of training steps each row (left) and column (right) "
                                  "was inside the trained block, per layer.", subnet_figure(kind, layers, run.label)))
            if any(r["step"] > 0 for r in run.subnets):
                out.append(("churn.png", "Overlap of each re-localized block with the block it replaced "
                                         "(1 = same rows and columns; lower = more churn), coloured by layer.",
                            churn_figure(run)))
    elif curve_runs:
        out += [
            ("loss.png", "Training loss per step, one curve per run.",
             curves_figure(curve_runs, "loss", "training loss", "loss (nats / target token)")),
            ("step_time.png", "Wall time per optimizer step, one curve per run.",
             curves_figure(curve_runs, "step_time_s", "step time", "seconds / step")),
            ("memory.png", "Peak memory per step (CUDA allocated on GPU, process RSS on CPU).",
             curves_figure(curve_runs, "peak_mem_bytes", "peak memory", "peak memory ({unit})")),
        ]
        if any(_series(r.metrics, "val_loss")[0] for r in curve_runs):
            out.append(("val_loss.png", "Validation loss, one curve per run.",
                        curves_figure(curve_runs, "val_loss", "validation loss", "loss (nats / target token)")))
    conts = [r for r in runs if r.continual]
    for i, run in enumerate(conts):
        name = "continual.png" if len(conts) == 1 else f"continual_{i + 1}.png"
        out.append((name, "Score on each task (columns) after each stage (rows); '–' = not evaluated.",
                    continual_figure(run.continual, run.label)))
    return out
