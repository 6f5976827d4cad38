"""Continual learning (`stages:` in a recipe): sequential fine-tuning, one task after another.

Stage i trains the method afresh on the weights the previous stage ended with (the initial model for
stage 1), as the paper's continual experiment does; PEFT adapters are merged first, so every stage
starts from a plain model. The initial model is evaluated on every task, and the model after each
stage on the tasks seen so far, giving the accuracy matrix a[i][j] (task j after stage i). Over the
tasks j learned before the last stage T-1 (s_j: the first stage that lists task j; with one task per
stage s_j = j, the papers' definitions):

    backward transfer (Lopez-Paz & Ranzato 2017)  BWT = mean_j  a[T-1][j] - a[s_j][j]
    forgetting (Chaudhry et al. 2018)             F   = mean_j  max_{s_j <= l < T-1} a[l][j] - a[T-1][j]

Layout, all under one parent run dir:

    runs/<name>/continual.json         matrix, BWT, forgetting; rewritten after every evaluation
    runs/<name>/initial/eval/          evaluation of the initial model
    runs/<name>/stage-<i>-<stage>/     an ordinary run dir (+ eval/, and merged/ for PEFT methods)
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from losia_cli import atomic
from losia_cli.config import RunConfig, StageConfig, format_validation_error
from losia_cli.engine import checkpoint
from losia_cli.engine.rundir import RunLock, check_fresh, continual_start, name_run
from losia_cli.engine.validation import mean_target_loss
from losia_cli.errors import ConfigError
from losia_cli.merge import merge
from losia_cli.methods import exports_adapter
from losia_cli.models import load_model, load_tokenizer, resolve_model_path
from losia_cli.workflow import train

# The headline metric of each eval kind: generate, code, multiple choice.
PRIMARY_METRICS = ("exact_match", "pass@1", "acc")
DATA_LOSS_SAMPLES = 32  # training samples per stage for the loss probe when eval.limit is unset


def stage_dir(cfg: RunConfig, index: int) -> Path:
    return cfg.run_dir() / f"stage-{index + 1}-{cfg.stages[index].name}"


def _model_at(cfg: RunConfig, weights: str):
    """cfg.model pointed at `weights`; a previous stage's local dir takes no hub revision."""
    if weights == cfg.model.name_or_path:
        return cfg.model
    return cfg.model.model_copy(update={"name_or_path": weights, "revision": None})


def stage_config(cfg: RunConfig, index: int, weights: str) -> RunConfig:
    """The ordinary run config of stage `index`: the run's config with the stage's data and train
    overrides, starting from `weights`, writing to runs/<name>/stage-<i>-<stage>/."""
    stage: StageConfig = cfg.stages[index]
    raw = cfg.model_dump()
    raw["data"].update(stage.data.model_dump(exclude_unset=True))
    raw["train"].update(stage.train.model_dump(exclude_unset=True))
    raw["model"] = _model_at(cfg, weights).model_dump()
    # The same dir as output_dir/name/stage-..., with run.name one plain dir name as everywhere.
    raw["run"].update(output_dir=str(cfg.run_dir()), name=stage_dir(cfg, index).name)
    raw["eval"]["after_train"] = False  # the orchestrator evaluates, on the seen tasks
    raw["stages"] = None
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:  # name the stage's key, as the user wrote it
        raise ConfigError(format_validation_error(e, prefix=("stages", index))) from None


def task_specs(stages: list[StageConfig]) -> tuple[dict[str, str], list[int]]:
    """({task name: eval spec} in order of first appearance, index of the stage that learns each)."""
    specs: dict[str, str] = {}
    learned: list[int] = []
    for i, stage in enumerate(stages):
        for spec in stage.eval_tasks:
            name = spec.partition("@")[0]
            if name in specs and specs[name] != spec:
                raise ConfigError(f"stages.{i}.eval_tasks: task {name} is already evaluated as "
                                  f"{specs[name]}; give each task name one eval set")
            if name not in specs:
                specs[name] = spec
                learned.append(i)
    return specs, learned


def backward_transfer(matrix: list[list[float | None]], learned: list[int]) -> float | None:
    """Mean over tasks learned before the last row of (last score - score right after learning)."""
    last = len(matrix) - 1
    deltas = [matrix[last][j] - matrix[s][j] for j, s in enumerate(learned)
              if s < last and matrix[last][j] is not None and matrix[s][j] is not None]
    return sum(deltas) / len(deltas) if deltas else None


def forgetting(matrix: list[list[float | None]], learned: list[int]) -> dict[int, float]:
    """{task index: best score before the last row (since learning it) - last score}."""
    last = len(matrix) - 1
    out = {}
    for j, s in enumerate(learned):
        before = [row[j] for row in matrix[s:last] if row[j] is not None]
        if s < last and before and matrix[last][j] is not None:
            out[j] = max(before) - matrix[last][j]
    return out


def headline(metrics: dict[str, float]) -> str:
    return next((m for m in PRIMARY_METRICS if m in metrics), next(iter(metrics)))


def data_loss(model, tokenizer, data_cfg, n: int, batch_size: int) -> float:
    """Mean target-token loss on the first n training samples of a stage: a finer forgetting signal
    than accuracy when a small model's scores sit near zero."""
    from losia_cli.data import build_dataset, make_collator
    from losia_cli.resources import cache_dir

    data = build_dataset(data_cfg, tokenizer, cache_dir=cache_dir() / "data")
    return mean_target_loss(model, data, make_collator(data_cfg, tokenizer), batch_size, n)


def _evaluate(cfg: RunConfig, weights: str, specs: list[str], stage_cfgs: list[RunConfig], out_dir: Path,
              console: Console) -> dict:
    """Scores of `specs`, the general-text loss and every stage's data loss for the model at `weights`."""
    from losia_cli.eval.command import run_eval

    model_cfg = _model_at(cfg, weights)
    path = resolve_model_path(model_cfg)
    tokenizer = load_tokenizer(path, model_cfg.revision, model_cfg.trust_remote_code)
    model = load_model(model_cfg, path)
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        model.to("cuda")
    eval_cfg = cfg.eval.model_copy(update={"tasks": specs, "after_train": False})
    result = run_eval(model, tokenizer, eval_cfg, out_dir, {"weights": weights}, console)
    n = cfg.eval.limit or DATA_LOSS_SAMPLES
    return {
        "metrics": {name: headline(r["metrics"]) for name, r in result["tasks"].items()},
        "scores": {name: r["metrics"][headline(r["metrics"])] for name, r in result["tasks"].items()},
        "general_text_loss": result.get("general_text_loss", {}).get("loss"),
        "data_loss": [data_loss(model, tokenizer, s.data, n, cfg.eval.batch_size) for s in stage_cfgs],
    }


def _stage_weights(cfg: RunConfig, run_dir: Path) -> str:
    """A plain model dir of what the stage trained: final/ itself, or PEFT adapters merged into it."""
    if not exports_adapter(cfg.method.name):
        return str(run_dir / "final")
    merged = run_dir / "merged"
    if not (merged / "MANIFEST.json").is_file():  # merge() publishes the dir atomically, manifest inside
        merge(run_dir, merged, dtype=cfg.model.dtype, force=True)
    return str(merged)


def _update_transfer(doc: dict, learned: list[int]) -> None:
    doc["backward_transfer"] = backward_transfer(doc["matrix"], learned) if doc["matrix"] else None
    per_task = forgetting(doc["matrix"], learned) if doc["matrix"] else {}
    doc["per_task_forgetting"] = {doc["tasks"][j]: value for j, value in per_task.items()}
    doc["forgetting"] = sum(per_task.values()) / len(per_task) if per_task else None


def run_continual(cfg: RunConfig, console: Console | None = None) -> Path:
    console = console or Console(soft_wrap=True)
    if cfg.dist.num_processes > 1:
        raise ConfigError("stages: continual runs train in one process (dist=single) for now")
    if cfg.run.resume not in (None, "auto"):
        raise ConfigError("run.resume: a continual run resumes stage by stage with run.resume=auto")
    if cfg.train.num_threads:  # evaluation runs before any training sets it
        torch.set_num_threads(cfg.train.num_threads)
    cfg = name_run(cfg)
    stage_cfgs = [stage_config(cfg, i, cfg.model.name_or_path) for i in range(len(cfg.stages))]
    specs, learned = task_specs(cfg.stages)
    if cfg.run.resume != "auto":  # the refusals before the lock creates anything (continual_start checks again)
        check_fresh(cfg.run_dir(), cfg.run.overwrite)
    # The parent dir, for the whole run (each stage's train() locks its own dir besides): a second
    # writer of the same run name is refused before it clears or rewrites anything here.
    lock = RunLock(cfg.run_dir())
    try:
        return _run_stages(cfg, stage_cfgs, specs, learned, console)
    finally:
        lock.release()


def _run_stages(cfg: RunConfig, stage_cfgs: list[RunConfig], specs: dict[str, str], learned: list[int],
                console: Console) -> Path:
    """The initial evaluation, then each stage's training and evaluation, under the parent's lock."""
    root = cfg.run_dir()
    doc = continual_start(cfg, {
        "method": cfg.method.name,
        "model": cfg.model.name_or_path,
        "stages": [{"name": s.name, "run_dir": str(stage_dir(cfg, i)),
                    "tasks": [t.partition("@")[0] for t in s.eval_tasks]} for i, s in enumerate(cfg.stages)],
        "tasks": list(specs),
        "task_specs": specs,
        "learned_at_stage": learned,
        "metrics": {},
        "initial": None,
        "matrix": [],
        "backward_transfer": None,
        "forgetting": None,
        "per_task_forgetting": {},
        "general_text_loss": {"initial": None, "after_stage": []},
        # Target-token loss on each stage's first training samples (columns: stages), incl. unseen ones.
        "data_loss": {"samples": cfg.eval.limit or DATA_LOSS_SAMPLES, "initial": None, "matrix": []},
        "eval": cfg.eval.model_dump(include={"limit", "batch_size", "max_new_tokens", "num_samples", "chat"}),
        "complete": False,
    })
    path = root / "continual.json"

    def record(row: dict, initial: bool) -> None:
        scores = [row["scores"].get(t) for t in doc["tasks"]]
        doc["metrics"].update(row["metrics"])
        if initial:
            doc["initial"] = scores
            doc["general_text_loss"]["initial"] = row["general_text_loss"]
            doc["data_loss"]["initial"] = row["data_loss"]
        else:
            doc["matrix"].append(scores)
            doc["general_text_loss"]["after_stage"].append(row["general_text_loss"])
            doc["data_loss"]["matrix"].append(row["data_loss"])
        _update_transfer(doc, learned)
        atomic.write_json(path, doc)

    if doc["initial"] is None:
        console.rule("initial model: every task")
        initial = _evaluate(cfg, cfg.model.name_or_path, list(specs.values()), stage_cfgs,
                            root / "initial" / "eval", console)
        record(initial, True)
    weights, retrained = cfg.model.name_or_path, False
    for i, stage in enumerate(cfg.stages):
        run_dir = stage_dir(cfg, i)
        # Once a stage trains again, every later one is stale: it started from the old weights.
        trained = (run_dir / "report.json").is_file() and not retrained
        if trained and i < len(doc["matrix"]):
            console.print(f"stage {i + 1} {stage.name}: finished, skipped ({run_dir})")
            weights = _stage_weights(cfg, run_dir)
            continue
        console.rule(f"stage {i + 1}/{len(cfg.stages)}: {stage.name}")
        for rows in (doc["matrix"], doc["general_text_loss"]["after_stage"], doc["data_loss"]["matrix"]):
            del rows[i:]  # this stage's row and the later ones are about to be replaced
        if not trained:
            resumable = cfg.run.resume == "auto" and not retrained and checkpoint.latest(run_dir)
            stage_cfg = stage_config(cfg, i, weights)
            train(stage_cfg.model_copy(update={"run": stage_cfg.run.model_copy(
                update={"resume": "auto" if resumable else None, "overwrite": True})}), console=console)
            retrained = True
        weights = _stage_weights(cfg, run_dir)
        seen = [spec for spec, first in zip(specs.values(), learned) if first <= i]
        record(_evaluate(cfg, weights, seen, stage_cfgs, run_dir / "eval", console), False)
    doc["complete"] = True
    atomic.write_json(path, doc)
    console.print(matrix_table(doc))
    console.print(f"continual results -> {path}")
    return root


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def matrix_table(doc: dict) -> Table:
    """Rows: initial model, then after each stage; columns: tasks (headline metric), general-text
    loss; caption: backward transfer and forgetting."""
    table = Table(title=f"continual learning, {doc['method']}: task scores after each stage",
                  caption=f"backward transfer {_fmt(doc['backward_transfer'])}, "
                          f"forgetting {_fmt(doc['forgetting'])}")
    table.add_column("after")
    for task in doc["tasks"]:
        table.add_column(f"{task} ({doc['metrics'].get(task, '?')})", justify="right")
    table.add_column("general-text loss", justify="right")
    gtl = doc["general_text_loss"]
    table.add_row("initial", *map(_fmt, doc["initial"]), _fmt(gtl["initial"]))
    for i, row in enumerate(doc["matrix"]):
        table.add_row(f"{i + 1} {doc['stages'][i]['name']}", *map(_fmt, row), _fmt(gtl["after_stage"][i]))
    return table
