"""`losia eval ... backend=lm_eval`: score the already-loaded model with lm-evaluation-harness.

The harness's own HF wrapper (HFLM) gets our model object, so any harness task runs with its own
prompts and metrics and the numbers compare with published ones. Results are written in our
`eval/results.json` shape (metrics / stderr / n per task), with the harness version and each task's
config beside them. Local tasks come in through `include_path` (a dir of task YAMLs).
"""

from __future__ import annotations

import time
from importlib import metadata
from pathlib import Path

from rich.console import Console


def _harness():
    try:
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        from losia_cli.errors import ModelError

        raise ModelError("backend=lm_eval needs lm-evaluation-harness: pip install 'losia-cli[lm_eval]'") from None
    return evaluator, HFLM, TaskManager


def _our_shape(task: str, output: dict) -> dict:
    """One harness task's results as an `evaluate()` result: metrics {name: value}, stderr, n."""
    metrics, stderr = {}, {}
    for key, value in output["results"][task].items():
        name, _, harness_filter = key.partition(",")
        if not isinstance(value, (int, float)) or name in ("alias", "sample_len"):
            continue
        label = name if harness_filter in ("", "none") else f"{name},{harness_filter}"
        if name.endswith("_stderr"):
            stderr[label.replace("_stderr", "", 1)] = value
        else:
            metrics[label] = value
    samples = output.get("samples", {}).get(task, [])
    return {
        "metrics": metrics,
        "stderr": stderr,
        "n": output["n-samples"][task]["effective"],
        "harness_task_config": output["configs"][task],
        "harness_task_version": output["versions"].get(task),
        "samples": [{"doc_id": s["doc_id"], "target": s["target"], "filtered_resps": s["filtered_resps"],
                     **{m: s[m] for m in metrics if m in s}} for s in samples],
    }


def run_lm_eval(model, tokenizer, cfg, out_dir: Path, identity: dict, console: Console) -> dict:
    """Evaluate harness tasks `cfg.tasks` (names, groups or tasks under `cfg.include_path`)."""
    from losia_cli.errors import DataError
    from losia_cli.eval.forgetting import general_text_loss
    from losia_cli.eval.results import model_identity, results_table, write_results

    evaluator, HFLM, TaskManager = _harness()
    if not cfg.tasks:
        raise DataError("backend=lm_eval: give harness task names, e.g. tasks=[arc_easy]")
    manager = TaskManager(include_path=cfg.include_path, verbosity="ERROR")
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor under include_path {cfg.include_path})" if cfg.include_path else ""
        raise DataError(f"backend=lm_eval: unknown harness task {unknown[0]!r}{where}")
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size,
              max_length=getattr(model.config, "max_position_embeddings", None))
    started = time.perf_counter()
    output = evaluator.simple_evaluate(
        model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit, task_manager=manager,
        log_samples=True, random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed, bootstrap_iters=1000,
        gen_kwargs={"max_gen_toks": cfg.max_new_tokens}, confirm_run_unsafe_code=cfg.allow_code_exec,
    )
    wall = time.perf_counter() - started
    results = {task: {**_our_shape(task, output), "wall_s": wall} for task in output["results"]}
    summary = {"backend": "lm_eval", "harness_version": metadata.version("lm_eval")}
    if cfg.forgetting:
        summary["general_text_loss"] = general_text_loss(model, tokenizer)
    write_results(out_dir, results, model={**model_identity(model), **identity},
                  config={**cfg.model_dump(), **summary})
    console.print(results_table(results))
    console.print(f"results -> {out_dir / 'results.json'}")
    return {"tasks": results, **summary}
