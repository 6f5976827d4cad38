"""The training recipe: one explicit loop, read top to bottom (torchtune style, no HF Trainer).

    train(cfg) = setup(cfg) -> run_steps(run) -> finish(run)
    setup:  run dir -> tokenizer + dataset -> model -> method.prepare -> optimizer -> resume
    steps:  one engine/step.py StepDriver step per optimizer step; metrics, checkpoints, preemption
    finish: method.finalize -> final/ -> report.json; returns the exported model (evaluating it and the
            model card are the command layer's: losia_cli/workflow.py)

Loss is normalised by the number of target tokens of the whole optimizer step (all micro-batches,
all ranks), so gradient accumulation and data parallelism give the gradient of one big batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from rich.console import Console
from rich.markup import escape

from losia_cli import atomic
from losia_cli.config import RunConfig
from losia_cli.data import build_dataset, make_collator
from losia_cli.data.tasks import load_chat_template
from losia_cli.engine import checkpoint, memory, rundir
from losia_cli.engine.distributed import (
    AcceleratorDist, count_grad_sync_bytes, make_accelerator, shard_model,
)
from losia_cli.engine.fingerprint import ranks_in_sync
from losia_cli.engine.preference import Objective, attach_reference, validate_pairs
from losia_cli.engine.preemption import Preempted, StopRequest
from losia_cli.engine.progress import TrainProgress
from losia_cli.engine.records import BufferedRecords, RunRecords, model_flops_utilisation, step_timings
from losia_cli.engine.step import StepDriver, build_optimizer
from losia_cli.engine.validation import mean_target_loss, save_interval, validations_since_best
from losia_cli.errors import ConfigError
from losia_cli.methods import Method, TrainContext, WarmupCosine, build_method
from losia_cli.methods.targets import describe_line
from losia_cli.models import load_model, load_tokenizer, resolve_model_path
from losia_cli.resources import cache_dir


@dataclass
class Run:
    """One training run's state, built by setup() and used by run_steps() and finish()."""

    cfg: RunConfig
    console: Console
    accelerator: Accelerator
    tokenizer: object
    data: object  # the tokenized dataset (data/dataset.py)
    val: object | None  # the validation set (data.val_split / data.val_source), None without one
    collate: object
    total_steps: int
    save_every: int | None  # train.save_every or its default (engine/validation.py)
    records: RunRecords | None  # on the main process only
    schedule: WarmupCosine
    method: Method
    model: torch.nn.Module  # as accelerate prepared it (DDP's wrapper, DeepSpeed's engine)
    unwrapped: torch.nn.Module  # what state dicts are read from
    driver: StepDriver
    grad_sync: dict | None  # DDP's all-reduced bytes (engine/distributed.py)
    dist: AcceleratorDist  # the method's view of the processes; counts what the method all-reduces
    start_step: int = 0
    # Per-step history, kept in checkpoints so the report covers the whole of a resumed run.
    history: dict = field(default_factory=lambda: {"step_time_s": [], "tokens": [], "loss": [], "val_loss": []})
    wall0: float = 0.0  # when the step loop started
    lock: rundir.RunLock | None = None  # rank 0's hold on the run dir, released when train() ends
    stopped_early_at: int | None = None  # the step early stopping ended the run at
    last_targets: int = 0  # target tokens (pairs, under a preference objective) of the last step read back
    reference: dict | None = None  # the DPO reference pass: computed or reused, seconds (report.json)
    runtime_bytes: int = 0  # memory held before the model was loaded (engine/memory.py)
    # What the first step of this process saved for backward and its gradients; the state after it.
    step_account: memory.StepAccount | None = None
    state_bytes: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir()

    @property
    def micro_per_epoch(self) -> int:
        return len(self.data) // (self.cfg.train.micro_batch_size * self.world)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.driver.optimizer


@dataclass
class Trained:
    """What a run leaves: its dir, and on the main process the exported model and the tokenizer
    (None on the other ranks), for the command layer to evaluate."""

    run_dir: Path
    model: torch.nn.Module | None = None
    tokenizer: object = None


def train(cfg: RunConfig, console: Console | None = None, then: Callable[[Trained], None] | None = None) -> Trained:
    """setup -> run_steps -> finish; then `then(trained)` (the command layer's eval and model card, which
    write into the run dir) while the run dir is still locked against a second writer."""
    run = setup(cfg, console or Console(soft_wrap=True))
    try:
        run_steps(run)
        trained = finish(run)
        if then is not None:
            then(trained)
        return trained
    finally:
        if run.lock:
            run.lock.release()


def setup(cfg: RunConfig, console: Console) -> Run:
    """Everything before the first step: run dir, data, model, method, optimizer, resume."""
    tc = cfg.train
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible")
    if tc.memory_profile and not (tc.device != "cpu" and torch.cuda.is_available()):
        raise ConfigError("train.memory_profile=true records the CUDA allocator; this run is on CPU "
                          "(report.json's memory_breakdown covers CPU runs)")
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    # Autocast is ours (StepDriver), not Accelerator(mixed_precision=...): accelerate's state is a
    # process-wide singleton that refuses a second run with another precision (sweeps, tests).
    accelerator = make_accelerator(cfg)
    memory.reset_peak(accelerator.device)  # report.json's peak is the whole run's, loading included
    main, world = accelerator.is_main_process, accelerator.num_processes
    cfg = rundir.name_run(cfg)
    if main:
        rundir.check(cfg)  # refusals only: nothing is created or deleted before the checks below

    # Data before weights: a bad data file is reported in seconds, not after loading a model.
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model.revision, cfg.model.trust_remote_code)
    if cfg.data.chat_template:  # the data layer renders with it; on the tokenizer, final/ carries it for chat
        tokenizer.chat_template = load_chat_template(cfg.data.chat_template)
    with accelerator.main_process_first():
        data = build_dataset(cfg.data, tokenizer, cache_dir=cache_dir() / "data")
        val = build_dataset(cfg.data, tokenizer, cache_dir=cache_dir() / "data", split="val")
    collate = make_collator(cfg.data, tokenizer)
    objective = Objective.of(tc)
    if (objective is not None) != data.pairs:
        raise ConfigError(f"train.objective={tc.objective} " + ("trains on preference pairs; set data.task=preference "
                          "or preference_messages" if objective else f"does not train on the preference pairs "
                          f"of data.task={cfg.data.task}; set train.objective=dpo or simpo"))
    set_seed(cfg.seed)
    runtime_bytes = memory.current(accelerator.device)
    # On its device before the method wraps it: LoSiA allocates its score buffers next to W.
    model = load_model(cfg.model, model_path).to(accelerator.device)
    model.config.use_cache = False
    reference = None
    if objective is not None and objective.needs_reference:  # the starting weights, before any method wraps them
        with accelerator.main_process_first():  # rank 0 computes and caches, the others read the cache
            reference = attach_reference(model, [data, val], collate, tc.micro_batch_size, _autocast(cfg, accelerator),
                                         {**cfg.model.model_dump(mode="json"), "precision": tc.precision})
    if len(data) < tc.micro_batch_size * world:
        raise ConfigError(
            f"data: {len(data)} samples is fewer than one micro-batch across ranks "
            f"(train.micro_batch_size={tc.micro_batch_size} x {world} processes)"
        )
    micro_per_epoch = len(data) // (tc.micro_batch_size * world)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * micro_per_epoch / tc.grad_accum))
    schedule = WarmupCosine(total_steps, int(tc.warmup_ratio * total_steps), tc.min_lr_ratio)
    # The method's initial records (LoSiA's step-0 subnets) wait until the run dir is claimed.
    initial = BufferedRecords()
    ctx = TrainContext(schedule=schedule, total_steps=total_steps, grad_accum=tc.grad_accum, seed=cfg.seed,
                       records=initial, dist=AcceleratorDist(accelerator), sharded_weights=cfg.dist.shards_weights)
    method = build_method(cfg.method)
    model = method.prepare(model, ctx)
    model, driver = _optimizing(cfg, accelerator, model, method)
    driver.objective = objective

    # Everything is checked: only now is the run dir created, locked, and cleared or resumed.
    def warn(line: str) -> None:  # on stderr, as compose's notes: the progress lines keep stdout
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[yellow]warning:[/] {escape(line)}")

    lock, resume_from = rundir.claim(cfg, warn) if main else (None, None)
    try:
        resume_from = broadcast_object_list([str(resume_from or "")])[0]  # rank 0 decides for all
        records = RunRecords(cfg.run_dir()) if main else None
        if main:
            ctx.records = records
        run = Run(cfg=cfg, console=console, accelerator=accelerator, tokenizer=tokenizer, data=data, val=val,
                  collate=collate, total_steps=total_steps,
                  save_every=save_interval(tc.save_every, total_steps, cfg.dist.name), records=records,
                  schedule=schedule, method=method, model=model, unwrapped=accelerator.unwrap_model(model),
                  driver=driver, grad_sync=count_grad_sync_bytes(model), dist=ctx.dist, lock=lock,
                  runtime_bytes=runtime_bytes, reference=reference)
        if resume_from:
            state = checkpoint.load(Path(resume_from), accelerator, run.unwrapped, run.optimizer, method)
            run.start_step = state["step"]
            run.history = {**run.history, **state.get("history", {})}
        if main:
            # Drop what a killed run wrote past its checkpoint (all of it, with none to resume from);
            # a fresh start's initial records come from this prepare(), a resumed one's from the checkpoint.
            records.truncate_after(run.start_step if resume_from else -1)
            if not resume_from:
                initial.replay(records)
            _announce(run, resume_from)
    except BaseException:
        if lock:
            lock.release()
        raise
    return run


def _optimizing(cfg: RunConfig, accelerator: Accelerator, model, method: Method):
    """(the model as accelerate prepared it, the StepDriver with the method's optimizer)."""
    tc = cfg.train
    if tc.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fsdp = cfg.dist.name == "fsdp" and accelerator.num_processes > 1
    if fsdp:  # before the optimizer exists: sharding swaps the parameter objects
        model = shard_model(model)
    optimizer = build_optimizer(method, tc.lr, tc.weight_decay, tc.betas, tc.eps)
    if fsdp:  # sharded already; accelerate would wrap it in DDP on top
        stepper = accelerator.prepare(optimizer)
    else:
        model, stepper = accelerator.prepare(model, optimizer)
    driver = StepDriver(model, method, optimizer, accelerator=accelerator, stepper=stepper,
                        max_grad_norm=tc.max_grad_norm, autocast=_autocast(cfg, accelerator))
    return model, driver


def _autocast(cfg: RunConfig, accelerator: Accelerator):
    return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")


def _announce(run: Run, resume_from: str) -> None:
    cfg = run.cfg
    run.records.write_config({**cfg.model_dump(mode="json"), "total_steps": run.total_steps}, run.device)
    summary = run.method.describe()
    run.console.print(
        f"[bold]losia[/] {cfg.method.name} on {cfg.model.name_or_path}: "
        f"{summary['trainable_params']:,} trainable of {summary['total_params']:,} params, "
        f"{len(run.data)} samples ({run.data.stats.get('n_tokens', '?')} tokens), {run.total_steps} steps "
        f"-> {run.run_dir}" + (f" (resumed at step {run.start_step})" if run.start_step else "")
        + f"\n  targets: {escape(describe_line(summary['targets']))}"
    )


def _micro_batch(data, collate, k: int, size: int, world: int, rank: int, seed: int):
    """The k-th micro-batch of this rank in a deterministic, resumable stream over epochs."""
    epoch, index = divmod(k, len(data) // (size * world))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch))
    start = (index * world + rank) * size
    return collate([data[i] for i in order[start : start + size].tolist()])


# Steps between host syncs when none is logged or saved: how long a stop signal may wait for its
# checkpoint, and how long the device may run ahead of the host.
SYNC_EVERY = 8


def run_steps(run: Run) -> None:
    """The step loop. SIGUSR1 / SIGTERM (Slurm preemption, time limit): checkpoint at a step boundary
    at most SYNC_EVERY steps later and raise Preempted (exit 75).

    The host reads the device (losses, token counts, the stop flag, the clock) only on sync steps:
    logged, saved, the last, and every SYNC_EVERY-th. The steps in between queue their work without
    waiting; each gets its window's mean step time.
    """
    cfg, tc, device = run.cfg, run.cfg.train, run.device
    progress = TrainProgress(run.console, run.total_steps, run.start_step, enabled=run.main)
    run.wall0 = time.perf_counter()
    run.step_account = memory.StepAccount(run.unwrapped)
    snapshot = memory.Snapshot(run.run_dir / "memory_snapshot.pickle") if tc.memory_profile and run.main else None
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (loss sum, [targets, inputs]) since the last sync
    window0 = time.perf_counter()
    with StopRequest().listening() as stop:
        run.model.train()
        for step in range(run.start_step, run.total_steps):
            micro = [
                _micro_batch(run.data, run.collate, step * tc.grad_accum + i, tc.micro_batch_size, run.world,
                             run.accelerator.process_index, cfg.seed)
                for i in range(tc.grad_accum)
            ]
            # The loss is a mean over the step's target tokens, or over its pairs (2 rows each).
            local_tokens = sum(len(b["labels"]) // 2 if run.driver.objective else int((b["labels"][:, 1:] != -100).sum())
                               for b in micro)
            counts = torch.tensor([local_tokens, sum(b["input_ids"].numel() for b in micro)], device=device)
            counts = run.accelerator.reduce(counts, reduction="sum")
            # accelerate (or DeepSpeed) divides by grad_accum and DDP averages over ranks; undo both so
            # the gradient is the mean over the step's target tokens. On the device: no host sync.
            scale = tc.grad_accum * run.world / counts[0].clamp(min=1)
            batches = ({k: v.to(device) for k, v in b.items()} for b in micro)
            first = step == run.start_step  # accounted: what it saves for backward, its gradients
            with run.step_account.measuring() if first else contextlib.nullcontext():
                loss_sum, grad_norm = run.driver.step(step, batches, scale)
            if first:
                run.state_bytes = memory.state_bytes(run.unwrapped, run.optimizer)
            pending.append((loss_sum, counts))
            done = step + 1
            if snapshot:
                snapshot.after_step(done - run.start_step, done == run.total_steps)
            logged = done % tc.log_every == 0 or done == run.total_steps
            saved = bool(run.save_every) and done % run.save_every == 0 and done < run.total_steps
            validating = _validation_due(run, done)
            if not (logged or saved or validating or done % SYNC_EVERY == 0):
                continue
            stops = _sync(run, pending, stop, time.perf_counter() - window0)
            pending, window0 = [], time.perf_counter()
            # The pairs' rewards since the last row: a collective, so on every rank.
            pairs = run.driver.objective.read(run.accelerator) if logged and run.driver.objective else {}
            if run.main and logged:
                metrics = {**_metrics(run, step, grad_norm), **pairs}
                run.records.metric(metrics)
                progress.update(done, metrics)
            stop_early = validating and _validate(run, done)
            preempted = done < run.total_steps and stops
            if preempted or saved:
                checkpoint.save(run.run_dir, done, run.accelerator, run.unwrapped, run.optimizer, run.method,
                                {"history": run.history}, tc.keep_last_n)
            if preempted:
                progress.close()
                raise Preempted(done)
            if stop_early:
                run.stopped_early_at = done
                if run.main:
                    run.console.print(f"early stopping at step {done}: no better validation loss in "
                                      f"{tc.early_stopping_patience} validations")
                break
    progress.close()


def _sync(run: Run, pending: list[tuple[torch.Tensor, torch.Tensor]], stop, elapsed: float) -> bool:
    """Read the window's steps into run.history (one all-reduce for their losses and whether any rank
    was asked to stop: a signal may reach the ranks at different steps, and they must all checkpoint
    at the same one); whether to stop."""
    stop_flag = torch.tensor(float(bool(stop)), device=run.device)
    losses = torch.stack([*(loss for loss, _ in pending), stop_flag])
    *losses, stops = run.accelerator.reduce(losses, reduction="sum").tolist()
    counts = torch.stack([c for _, c in pending]).tolist()
    for loss, (targets, inputs) in zip(losses, counts):
        run.history["step_time_s"].append(elapsed / len(pending))
        run.history["tokens"].append(int(inputs))
        run.history["loss"].append(loss / max(int(targets), 1))
    run.last_targets = int(counts[-1][0])
    return bool(stops)


def _metrics(run: Run, step: int, grad_norm: torch.Tensor | None) -> dict:
    """The metrics.jsonl record of update `step` (its history entries are read already)."""
    tc, done = run.cfg.train, step + 1
    step_time, tokens = run.history["step_time_s"][-1], run.history["tokens"][-1]
    return {
        "step": done,
        "loss": run.history["loss"][-1],
        # The run's schedule; LoSiA's per-slot rewarm multipliers are in lr_groups.
        "lr": tc.lr * run.schedule.factor(step),
        "lr_groups": [g["lr"] for g in run.optimizer.param_groups],
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens": tokens,
        "target_tokens": run.last_targets,
        "step_time_s": step_time,
        "tokens_per_s": tokens / step_time,
        "peak_mem_bytes": memory.peak(run.device),
        "epoch": (done * tc.grad_accum - 1) // run.micro_per_epoch,
    }


def _validation_due(run: Run, done: int) -> bool:
    """Whether the validation loss is taken after update `done`: every train.eval_every steps
    (default: the checkpoint interval) and at the end."""
    every = run.cfg.train.eval_every or run.save_every or run.total_steps
    return run.val is not None and (done % every == 0 or done == run.total_steps)


def _validate(run: Run, done: int) -> bool:
    """The validation loss (when _validation_due) -> metrics.jsonl; a new best is kept in
    checkpoints/best. Returns whether to stop early."""
    tc, rank, world = run.cfg.train, run.accelerator.process_index, run.accelerator.num_processes
    if run.driver.objective:  # the pair loss, rewards and preference accuracy of the held-out pairs
        row = validate_pairs(run.model, run.val, run.collate, tc.micro_batch_size, run.driver.objective, rank, world)
    else:
        row = {"val_loss": mean_target_loss(run.model, run.val, run.collate, tc.micro_batch_size,  # its share
                                            rank=rank, world=world)}
    loss = row["val_loss"]
    run.history["val_loss"].append([done, loss])
    if run.main:
        run.records.metric({"step": done, **row})
    since_best = validations_since_best(run.history["val_loss"])
    if since_best == 0 and run.save_every:  # no save_every: a dist that cannot checkpoint (zero3)
        checkpoint.save(run.run_dir, done, run.accelerator, run.unwrapped, run.optimizer, run.method,
                        {"history": run.history}, tc.keep_last_n, name="best")
    return bool(tc.early_stopping_patience) and since_best >= tc.early_stopping_patience


def finish(run: Run) -> Trained:
    """final/ (the exported model and the tokenizer) and report.json."""
    cfg, method, accelerator = run.cfg, run.method, run.accelerator
    method.finalize(run.unwrapped)
    sharded = (cfg.dist.name == "fsdp" and run.world > 1) or cfg.dist.name == "zero3"
    in_sync = ranks_in_sync(accelerator, run.unwrapped)
    full_state = checkpoint.whole_state_dict(accelerator, run.model) if sharded else None
    if not run.main:
        return Trained(run.run_dir)
    final = method.export(run.unwrapped)
    with atomic.directory(run.run_dir / "final", overwrite=True) as tmp:
        method.save(final, tmp, full_state)
        run.tokenizer.save_pretrained(tmp)
        if cfg.run.final != "full":
            from losia_cli.delta import write_final

            write_final(run.run_dir, final, tmp, keep_full=cfg.run.final == "both")
    report = _report(run, in_sync)
    run.records.write_report(report)
    run.records.close()
    run.console.print(
        f"[green]done[/] {run.total_steps} steps, loss {report['first_loss']:.4f} -> {report['final_loss']:.4f}, "
        f"p50 {report['step_time_s']['p50']:.2f} s/step -> {run.run_dir}"
    )
    return Trained(run.run_dir, final, run.tokenizer)


def _report(run: Run, in_sync: bool) -> dict:
    """report.json (docs/architecture.md, section 3)."""
    history, device = run.history, run.device
    timings = step_timings(history["step_time_s"], history["tokens"])
    summary = run.method.describe()
    steps = max(1, run.total_steps - run.start_step)
    return {
        **summary,
        "objective": run.cfg.train.objective,
        # DPO's reference log-probs: computed by this run (seconds of that pass) or read from the cache.
        "reference": run.reference,
        "total_steps": run.total_steps,
        "step_time_s": {"p50": timings["p50"], "p95": timings["p95"]},
        "tokens_per_s": timings["tokens_per_s"],
        "mfu": model_flops_utilisation(device, summary["total_params"], timings["tokens_per_s"], run.world),
        "peak_mem_bytes": memory.peak(device),
        "memory_breakdown": memory.breakdown(memory.peak(device), run.runtime_bytes, run.state_bytes,
                                             run.step_account),
        **run.method.report_extras(),
        "num_processes": run.world,
        "ranks_in_sync": in_sync,
        # Bytes all-reduced per optimizer step (this process's steps; None without DDP).
        "grad_sync_bytes_per_step": run.grad_sync and (run.grad_sync["bytes"] + run.dist.reduced_bytes) / steps,
        # Of those, what the method all-reduced itself (LoSiA's scoring layer's m x n gradient).
        "method_sync_bytes_per_step": run.grad_sync and run.dist.reduced_bytes / steps,
        "method_step_time_s": run.driver.method_time_s,
        "first_loss": history["loss"][0],
        "final_loss": history["loss"][-1],
        "val_loss": {"best": min(v for _, v in history["val_loss"]), "final": history["val_loss"][-1][1]}
        if history["val_loss"] else None,
        "stopped_early_at": run.stopped_early_at,
        "wall_s": time.perf_counter() - run.wall0,
        "data": run.data.stats,
    }

