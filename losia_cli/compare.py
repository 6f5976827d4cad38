"""`losia compare`: train several methods on the same recipe, data and seed, evaluate each, and
write one table (quality, time, memory, forgetting) to runs/compare-<stamp>/compare.json."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from losia_cli import atomic


def _general_text_loss_of_base(cfg) -> float:
    from losia_cli.eval.forgetting import general_text_loss
    from losia_cli.models import best_device, load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model)
    model = load_model(cfg.model, path).to(best_device())
    return general_text_loss(model, load_tokenizer(path))["loss"]


def compare(methods: list[str], overrides: list[str], console: Console, recipes: Path | None = None) -> Path:
    from losia_cli.compose import load_config
    from losia_cli.workflow import train
    from losia_cli.provenance import timestamp
    from losia_cli.eval.forgetting import forgetting_delta

    stamp = timestamp()
    configs = [  # validate every method's config before training any of them
        load_config([*overrides, f"method={m}", f"run.name=compare-{stamp}-{m}", "eval.after_train=true",
                     "eval.forgetting=true"], recipes)
        for m in methods
    ]
    base_loss = _general_text_loss_of_base(configs[0])
    rows = []
    for cfg in configs:
        run_dir = train(cfg, console=console)
        report = json.loads((run_dir / "report.json").read_text())
        evaluation = json.loads((run_dir / "eval" / "results.json").read_text())
        after = evaluation["config"]["general_text_loss"]
        rows.append({
            "method": cfg.method.name,
            "run_dir": str(run_dir),
            "trainable_params": report["trainable_params"],
            "final_loss": report["final_loss"],
            "step_time_s_p50": report["step_time_s"]["p50"],
            "peak_mem_bytes": report["peak_mem_bytes"],
            "optimizer_state_bytes": report["optimizer_state_bytes"],
            "tasks": {t: r["metrics"] for t, r in evaluation["tasks"].items()},
            "forgetting_delta": forgetting_delta(base_loss, after),
        })
    out = Path(configs[0].run.output_dir) / f"compare-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "compare.json", {"base_general_text_loss": base_loss, "methods": rows})
    console.print(comparison_table(rows))
    console.print(f"comparison -> {out / 'compare.json'}")
    return out


def comparison_table(rows: list[dict]) -> Table:
    metrics = sorted({(t, m) for row in rows for t, ms in row["tasks"].items() for m in ms})
    table = Table(title="method comparison (same data, seed and steps)")
    for column in ["method", "trainable", "final loss", *[f"{t} {m}" for t, m in metrics],
                   "s/step p50", "peak mem GiB", "forgetting Δ"]:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(
            row["method"], f"{row['trainable_params']:,}", f"{row['final_loss']:.4f}",
            *[f"{row['tasks'].get(t, {}).get(m, float('nan')):.4f}" for t, m in metrics],
            f"{row['step_time_s_p50']:.2f}", f"{row['peak_mem_bytes'] / 2**30:.2f}",
            f"{row['forgetting_delta']:+.4f}",
        )
    return table
