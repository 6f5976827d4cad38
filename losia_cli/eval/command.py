"""`losia eval`: load a run / model dir / hub id, evaluate tasks, write `eval/` and print a table.

Rows come through the data pipeline (same sources and the same task templates as training), so
the eval prompt of a task is by construction the prompt it was trained on.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console

from losia_cli.config import ModelConfig
from losia_cli.eval.defaults import DEFAULT_SOURCES
from losia_cli.schema import EvalConfig


def load_rows(spec: str, limit: int | None) -> tuple[str, list[dict]]:
    """(task name, rows) for TASK or TASK@SOURCE, loaded through the data pipeline."""
    from losia_cli.data import DataConfig, get_task
    from losia_cli.errors import DataError
    from losia_cli.data.sources import Source, prepare_rows

    name, _, source = spec.partition("@")
    task = get_task(name)
    if source:
        cfg = DataConfig(task=name, source=source, split="test" if source.startswith("hub:") else "train")
    elif name in DEFAULT_SOURCES:
        hub_source, hub_config, split = DEFAULT_SOURCES[name]
        cfg = DataConfig(task=name, source=hub_source, hub_config=hub_config, split=split)
    else:
        raise DataError(f"task {name!r} has no default eval set; give one as {name}@SOURCE "
                        f"(e.g. {name}@bundled:{name}_sample or {name}@/path/to/test.jsonl)")
    rows = prepare_rows(cfg, Source(cfg), task.fields, task.path)
    rows = [rows[i] for i in range(len(rows) if limit is None else min(limit, len(rows)))]
    if not rows:
        raise DataError(f"task {name}: {cfg.source} has no rows")
    return name, rows


def load_target(target: str):
    """(model, tokenizer, identity, default output dir) for a run dir, model dir, .gguf or hub id."""
    from losia_cli.models import best_device, load_model, load_tokenizer, resolve_model_path
    from losia_cli.runmodel import load_run_model
    from losia_cli.provenance import timestamp

    path = Path(target)
    marker = path / "config.yaml"
    if marker.exists() or marker.is_symlink():  # a run dir (load_run_model names a damaged config.yaml or final/)
        model, tokenizer, _ = load_run_model(path)  # folds PEFT adapters; LoSiA/full load as is
        return model.to(best_device()), tokenizer, {"run_dir": str(path.resolve())}, path / "eval"
    if (path / "delta_config.json").is_file():  # a delta dir: the base it names with the delta applied
        from losia_cli.delta import load_with_delta

        model, tokenizer = load_with_delta(path)
        identity = {"name_or_path": str(path)}
    else:
        cfg = ModelConfig(name_or_path=target)
        resolved = resolve_model_path(cfg)
        tokenizer = load_tokenizer(resolved)
        model = load_model(cfg, resolved)
        identity = {"name_or_path": target}
    model = model.to(best_device())
    slug = target.rstrip("/").replace("/", "_").replace(":", "_")
    return model, tokenizer, identity, Path("runs") / f"eval-{slug}-{timestamp()}" / "eval"


def run_eval(model, tokenizer, cfg: EvalConfig, out_dir: Path, identity: dict, console: Console,
             baseline: tuple | None = None) -> dict:
    from losia_cli.eval.forgetting import forgetting_delta, general_text_loss
    from losia_cli.eval.results import model_identity, results_table, write_results
    from losia_cli.eval.runner import evaluate

    if cfg.backend == "lm_eval":
        from losia_cli.eval.lm_eval_backend import run_lm_eval

        return run_lm_eval(model, tokenizer, cfg, out_dir, identity, console)
    cfg.require_work()
    task_rows = [load_rows(spec, cfg.limit) for spec in cfg.tasks]  # fail on bad data before scoring
    options = dict(
        allow_code_exec=cfg.allow_code_exec, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
        num_samples=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
        timeout_s=cfg.timeout_s, seed=cfg.seed, chat=cfg.chat,
    )
    model.eval()
    results: dict[str, dict] = {}
    for name, rows in task_rows:
        started = time.perf_counter()
        with torch.no_grad():
            results[name] = evaluate(model, tokenizer, name, rows, **options)
        results[name]["wall_s"] = time.perf_counter() - started
        if baseline is not None:
            base = evaluate(baseline[0], baseline[1], name, rows, **options)
            results[name]["baseline_metrics"] = base["metrics"]
            results[name]["delta_vs_baseline"] = {
                k: v - base["metrics"][k] for k, v in results[name]["metrics"].items()
            }
    summary = {}
    if cfg.forgetting:
        after = general_text_loss(model, tokenizer, path=cfg.general_text)
        summary["general_text_loss"] = after
        if baseline is not None:
            before = general_text_loss(baseline[0], baseline[1], path=cfg.general_text)
            summary["general_text_loss_baseline"] = before
            summary["forgetting_delta"] = forgetting_delta(before, after)
    write_results(out_dir, results, model={**model_identity(model), **identity},
                  config={**cfg.model_dump(), **summary})
    if results:
        console.print(results_table(results))
    if "forgetting_delta" in summary:
        console.print(f"general-text loss {summary['general_text_loss']['loss']:.4f} "
                      f"(baseline {summary['general_text_loss_baseline']['loss']:.4f}, "
                      f"forgetting delta {summary['forgetting_delta']:+.4f})")
    elif "general_text_loss" in summary:
        console.print(f"general-text loss {summary['general_text_loss']['loss']:.4f}")
    console.print(f"results -> {out_dir / 'results.json'}")
    return {"tasks": results, **summary}
