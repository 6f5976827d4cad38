"""`losia compare`: train several methods on the same recipe and data, evaluate each, and write one
table (quality, time, memory, forgetting) to runs/compare-<stamp>/compare.json and compare.md.

With `seeds=[...]` every method trains once per seed; with `lr_grid=[...]` it first trains each
learning rate of the grid (at the first seed), keeps the one that scores best on `val_tasks` (a
validation split: the test tasks in `eval.tasks` are never looked at to choose), then trains the
other seeds at that rate. Per test task the report gives the per-seed values, their mean and a 95%
interval bootstrapped over test items and seeds (`bootstrap_interval`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from losia_cli import atomic
from losia_cli.errors import UsageError

BOOTSTRAP_REPLICATES = 2000  # percentile ends move by well under 0.01 between seeds of the resampling


def bootstrap_interval(scores, *, level: float = 0.95, replicates: int = BOOTSTRAP_REPLICATES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `scores`, an array [seeds, items] of per-item
    scores (every seed scored on the same test items). Each replicate draws seeds with replacement
    and, independently, items with replacement, and takes the mean of that sub-table, so the interval
    carries both the test set's sampling noise and the training runs' seed-to-seed noise (a two-way
    bootstrap; with one seed only the first). Seeded: the same scores give the same interval."""
    table = np.asarray(scores, dtype=np.float64)
    if table.ndim != 2 or 0 in table.shape:
        raise ValueError(f"scores must be a non-empty [seeds, items] table, got shape {table.shape}")
    rng = np.random.default_rng(seed)
    n_seeds, n_items = table.shape
    means = np.empty(replicates)
    for start in range(0, replicates, 256):  # chunks bound the [chunk, seeds, items] gather's memory
        stop = min(start + 256, replicates)
        rows = rng.integers(0, n_seeds, (stop - start, n_seeds))
        cols = rng.integers(0, n_items, (stop - start, n_items))
        means[start:stop] = table[rows[:, :, None], cols[:, None, :]].mean(axis=(1, 2))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def primary_metric(metrics: dict) -> str:
    """The task's headline metric: the first an evaluator reports (exact_match, acc, pass@1)."""
    return next(iter(metrics))


def item_scores(result: dict) -> list[float]:
    """Per-item scores of one task's `evaluate()` result, in item order: each item's samples'
    mean correctness (one sample per item when greedy; pass@1's unbiased estimate c/n otherwise)."""
    samples, n = result["samples"], result["n"]
    per_item = len(samples) // n
    return [sum(float(s["correct"]) for s in samples[i * per_item:(i + 1) * per_item]) / per_item
            for i in range(n)]


def _text_key(text: str) -> str:
    return " ".join(text.split()).lower()


def _prompt_keys(task, rows, tokenizer) -> list[str]:
    """What identifies an item: its training prompt (for a text task, its text), whitespace- and
    case-folded, so a test question reworded only in spacing still counts as seen."""
    keys = []
    for i in range(len(rows)):
        prompt, response = task.render_train(rows[i], tokenizer)
        keys.append(_text_key(prompt or response))
    return keys


def check_disjoint(data_cfg, specs: list[str], limit: int | None, tokenizer) -> None:
    """Refuse (DataError, one line) when any item of the eval task specs appears in the rows training
    reads (after max_samples and val_split), compared by prompt."""
    from losia_cli.data.dataset import resolve_task, select_rows, split_parts
    from losia_cli.errors import DataError
    from losia_cli.data.sources import Source, prepare_rows
    from losia_cli.data.tasks import get_task
    from losia_cli.eval.command import load_rows

    seen: set[str] = set()
    for part, _ in split_parts(data_cfg, "train"):
        task = resolve_task(part)
        rows = prepare_rows(part, Source(part), task.fields, task.path)
        rows = rows.select(select_rows(part, len(rows), "train"))
        seen.update(_prompt_keys(task, rows, tokenizer))
    for spec in specs:
        name, rows = load_rows(spec, limit)
        hits = [i for i, key in enumerate(_prompt_keys(get_task(name), rows, tokenizer)) if key in seen]
        if hits:
            raise DataError(f"{spec}: {len(hits)} of {len(rows)} eval items are also in the training data "
                            f"(first: item {hits[0]}); test and validation items must not be trained on")


def _quoted_list(items: list[str]) -> str:
    """A Hydra override list whose items may hold ':', '/', '@' or ','."""
    return "[" + ",".join("'" + item.replace("\\", "\\\\").replace("'", "\\'") + "'" for item in items) + "]"


def compare(methods: list[str], overrides: list[str], console: Console, recipes: Path | None = None,
            seeds: list[int] | None = None, lr_grid: list[float] | None = None,
            val_tasks: list[str] | None = None) -> Path:
    from losia_cli.compose import load_config
    from losia_cli.eval.command import load_target, run_eval
    from losia_cli.models import best_device, load_model, load_tokenizer, resolve_model_path
    from losia_cli.provenance import timestamp
    from losia_cli.workflow import train

    stamp = timestamp()

    def config(method: str, name: str, *extra: str, quiet: bool = True):
        return load_config([*overrides, f"method={method}", f"run.name=compare-{stamp}-{name}",
                            "eval.forgetting=true", *extra], recipes, quiet=quiet)

    configs = [config(m, m, quiet=False) for m in methods]  # validate every method before training any
    first = configs[0]
    seeds = list(seeds or [first.seed])
    val_tasks = list(val_tasks or [])
    test_tasks = list(first.eval.tasks)
    if lr_grid and len(lr_grid) > 1 and not val_tasks:
        raise UsageError("lr_grid: choosing a learning rate needs val_tasks=[TASK@SOURCE,...] "
                         "(a validation split; the test tasks in eval.tasks are never used to choose)")
    if set(val_tasks) & set(test_tasks):
        raise UsageError(f"val_tasks: {sorted(set(val_tasks) & set(test_tasks))[0]} is also a test task "
                         "(eval.tasks); choose the learning rate on a separate validation split")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds: {seeds} repeats a seed")
    path = resolve_model_path(first.model)
    base_model, tokenizer = load_model(first.model, path).to(best_device()), load_tokenizer(path)
    check_disjoint(first.data, test_tasks + val_tasks, first.eval.limit, tokenizer)

    out = Path(first.run.output_dir) / f"compare-{stamp}"
    base = run_eval(base_model, tokenizer, first.eval, out / "base", {"name_or_path": first.model.name_or_path},
                    console)
    del base_model
    base_loss = base["general_text_loss"]["loss"]
    rows = []
    for method, cfg in zip(methods, configs):
        grid, grid_runs = {}, {}
        lr = lr_grid[0] if lr_grid else cfg.train.lr  # a one-rate grid needs no validation
        if lr_grid and len(lr_grid) > 1:
            for candidate in lr_grid:  # each rate at the first seed, scored on validation only
                run_dir = train(config(method, f"{method}-lr{candidate:g}-s{seeds[0]}", f"train.lr={candidate}",
                                       f"seed={seeds[0]}", "eval.after_train=true", "eval.forgetting=false",
                                       f"eval.tasks={_quoted_list(val_tasks)}"), console=console)
                val = json.loads((run_dir / "eval" / "results.json").read_text())["tasks"]
                grid[f"{candidate:g}"] = float(np.mean([r["metrics"][primary_metric(r["metrics"])]
                                                        for r in val.values()]))
                grid_runs[candidate] = run_dir
            lr = lr_grid[int(np.argmax(list(grid.values())))]  # a tie keeps the earlier rate of the grid
        runs = []
        for seed in seeds:
            run_dir = grid_runs.get(lr) if seed == seeds[0] else None  # the chosen rate's run at seed 0
            run_dir = run_dir or train(config(method, f"{method}-lr{lr:g}-s{seed}", f"train.lr={lr}",
                                              f"seed={seed}", "eval.after_train=false"), console=console)
            model, run_tokenizer, identity, _ = load_target(str(run_dir))  # every seed scored the same way
            evaluation = run_eval(model, run_tokenizer, cfg.eval, run_dir / "eval-test", identity, console)
            del model
            runs.append({
                "seed": seed, "run_dir": str(run_dir), "report": json.loads((run_dir / "report.json").read_text()),
                "tasks": {t: r["metrics"] for t, r in evaluation["tasks"].items()},
                "items": {t: item_scores(r) for t, r in evaluation["tasks"].items()},
                "forgetting_delta": evaluation["general_text_loss"]["loss"] - base_loss,
            })
        rows.append(_method_row(method, lr, grid, runs, base["tasks"]))
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "compare.json", {
        "seeds": seeds, "lr_grid": lr_grid, "val_tasks": val_tasks, "test_tasks": test_tasks,
        "interval": f"{BOOTSTRAP_REPLICATES}-replicate percentile bootstrap over test items and seeds, 95%",
        "base_general_text_loss": base_loss, "base_general_text_tokens": base["general_text_loss"]["tokens"],
        "base_tasks": {t: r["metrics"] for t, r in base["tasks"].items()}, "methods": rows,
    })
    atomic.write_text(out / "compare.md", markdown_table(rows))
    console.print(comparison_table(rows))
    console.print(f"comparison -> {out / 'compare.json'}")
    return out


def _method_row(method: str, lr: float, grid: dict, runs: list[dict], base_tasks: dict) -> dict:
    reports = [r["report"] for r in runs]
    intervals = {}
    for task in runs[0]["tasks"]:
        metric = primary_metric(runs[0]["tasks"][task])
        table = [r["items"][task] for r in runs]
        low, high = bootstrap_interval(table)
        mean = float(np.mean(table))
        intervals[task] = {
            "metric": metric, "mean": mean, "low": low, "high": high,
            "per_seed": [r["tasks"][task][metric] for r in runs], "n_items": len(table[0]),
            "change_vs_base": mean - base_tasks[task]["metrics"][metric],
        }
    forgetting = [r["forgetting_delta"] for r in runs]
    return {
        "method": method, "lr": lr, "lr_grid_val": grid or None, "seeds": [r["seed"] for r in runs],
        "run_dir": runs[0]["run_dir"], "run_dirs": [r["run_dir"] for r in runs],
        "trainable_params": reports[0]["trainable_params"],
        "final_loss": float(np.mean([rep["final_loss"] for rep in reports])),
        "step_time_s_p50": float(np.median([rep["step_time_s"]["p50"] for rep in reports])),
        "train_wall_s": [rep["wall_s"] for rep in reports],
        "peak_mem_bytes": max(rep["peak_mem_bytes"] for rep in reports),
        "optimizer_state_bytes": reports[0]["optimizer_state_bytes"],
        "tasks": {t: {m: float(np.mean([r["tasks"][t][m] for r in runs])) for m in runs[0]["tasks"][t]}
                  for t in runs[0]["tasks"]},
        "intervals": intervals,
        "forgetting_delta": float(np.mean(forgetting)), "forgetting_per_seed": forgetting,
    }


def _cells(row: dict) -> list[str]:
    tasks = [f"{i['mean']:.3f} [{i['low']:.3f}, {i['high']:.3f}] ({', '.join(f'{v:.3f}' for v in i['per_seed'])})"
             for i in row["intervals"].values()]
    grid = ", ".join(f"{lr}: {v:.3f}" for lr, v in (row["lr_grid_val"] or {}).items()) or "-"
    return [row["method"], f"{row['lr']:g}", grid, f"{row['trainable_params']:,}", *tasks,
            f"{row['forgetting_delta']:+.4f}", f"{row['step_time_s_p50']:.2f}", f"{row['peak_mem_bytes'] / 2**30:.2f}"]


def _columns(rows: list[dict]) -> list[str]:
    tasks = [f"{t} {i['metric']} mean [95% CI] (per seed)" for t, i in rows[0]["intervals"].items()]
    return ["method", "lr", "val score by lr", "trainable", *tasks, "forgetting Δ nats", "s/step p50",
            "peak mem GiB"]


def comparison_table(rows: list[dict]) -> Table:
    table = Table(title="method comparison (same data and steps; mean over seeds, 95% bootstrap interval)")
    for column in _columns(rows):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(*_cells(row))
    return table


def markdown_table(rows: list[dict]) -> str:
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"
