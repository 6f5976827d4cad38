"""The training recipe: one explicit loop, read top to bottom (torchtune style, no HF Trainer).

    config -> model + tokenizer -> method.prepare -> dataset -> loop -> run dir

Loss is normalised by the number of target tokens of the whole optimizer step (all micro-batches,
all ranks), so gradient accumulation and data parallelism give the gradient of one big batch.
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from accelerate.utils import broadcast, broadcast_object_list, set_seed
from rich.console import Console

from losia_cli import atomic
from losia_cli.config import ConfigError, RunConfig
from losia_cli.data import build_dataset, make_collator
from losia_cli.engine import checkpoint
from losia_cli.engine.distributed import (
    count_grad_sync_bytes, deepspeed_optimizer, make_accelerator, ranks_in_sync, shard_model,
)
from losia_cli.engine.preemption import Preempted, StopRequest
from losia_cli.engine.progress import TrainProgress
from losia_cli.engine.records import RunRecords, step_timings
from losia_cli.methods import TrainContext, WarmupCosine, build_method
from losia_cli.model_card import write_model_card
from losia_cli.models import load_model, load_tokenizer, resolve_model_path
from losia_cli.resources import cache_dir


def name_run(cfg: RunConfig) -> RunConfig:
    """Fill in run.name (before any process launch, so every rank writes to the same dir)."""
    if cfg.run.name:
        return cfg
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{cfg.recipe or 'run'}-{cfg.method.name}-{stamp}"
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})


def _check_run_dir(cfg: RunConfig) -> Path | None:
    """Refuse to clobber a run by accident; return the checkpoint to resume from, if any."""
    run_dir = cfg.run_dir()
    if cfg.run.resume == "auto":
        if (run_dir / "report.json").is_file():
            raise ConfigError(f"run.resume=auto: {run_dir} has finished already (it has report.json)")
        return checkpoint.latest(run_dir)
    if cfg.run.resume:
        path = Path(cfg.run.resume)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"run.resume: {path} is not a complete checkpoint dir")
        return path
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.run.overwrite:
            raise ConfigError(
                f"run dir {run_dir} already exists; pass run.resume=auto to continue it "
                "or run.overwrite=true to start over"
            )
        shutil.rmtree(run_dir)
    return None


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _micro_batch(data, collate, k: int, size: int, world: int, rank: int, seed: int):
    """The k-th micro-batch of this rank in a deterministic, resumable stream over epochs."""
    epoch, index = divmod(k, len(data) // (size * world))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch))
    start = (index * world + rank) * size
    return collate([data[i] for i in order[start : start + size].tolist()])


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over target tokens (labels != -100)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def train(cfg: RunConfig, console: Console | None = None) -> Path:
    console = console or Console(soft_wrap=True)
    tc = cfg.train
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible")
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    # Autocast is ours (below), not Accelerator(mixed_precision=...): accelerate's state is a
    # process-wide singleton that refuses a second run with another precision (sweeps, tests).
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    cfg = name_run(cfg)
    run_dir = cfg.run_dir()
    resume_from = _check_run_dir(cfg) if main else None
    resume_from = broadcast_object_list([str(resume_from or "")])[0]  # rank 0 decides for all

    # Data before weights: a bad data file is reported in seconds, not after loading a model.
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model.revision, cfg.model.trust_remote_code)
    with accelerator.main_process_first():
        data = build_dataset(cfg.data, tokenizer, cache_dir=cache_dir() / "data")
    collate = make_collator(cfg.data, tokenizer)
    set_seed(cfg.seed)
    device = accelerator.device
    # On its device before the method wraps it: LoSiA allocates its score buffers next to W.
    model = load_model(cfg.model, model_path).to(device)
    model.config.use_cache = False
    global_micro = tc.micro_batch_size * world
    if len(data) < global_micro:
        raise ConfigError(
            f"data: {len(data)} samples is fewer than one micro-batch across ranks "
            f"(train.micro_batch_size={tc.micro_batch_size} x {world} processes)"
        )
    micro_per_epoch = len(data) // global_micro
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * micro_per_epoch / tc.grad_accum))

    records = RunRecords(run_dir) if main else None
    schedule = WarmupCosine(total_steps, int(tc.warmup_ratio * total_steps), tc.min_lr_ratio)
    ctx = TrainContext(
        schedule=schedule,
        total_steps=total_steps,
        grad_accum=tc.grad_accum,
        seed=cfg.seed,
        # A resumed run's initial blocks are in subnets.jsonl already (and the checkpoint replaces
        # them): the records start after prepare() then.
        log_subnet=records.subnet if main and not resume_from else (lambda record: None),
        world_size=world,
        all_reduce_sum=lambda t: t.copy_(accelerator.reduce(t, reduction="sum")) if world > 1 else None,
        broadcast_from_main=lambda t: broadcast(t, from_process=0) if world > 1 else t,
        refresh_master_weights=lambda: (zero := deepspeed_optimizer(accelerator)) and zero.refresh_fp32_params(),
        sharded_weights=cfg.dist.shards_weights,
    )
    method = build_method(cfg.method)
    model = method.prepare(model, ctx)
    if main:
        ctx.log_subnet = records.subnet
    if tc.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fsdp = cfg.dist.name == "fsdp" and world > 1
    if fsdp:  # before the optimizer exists: sharding swaps the parameter objects
        model = shard_model(model)
    groups = method.param_groups(tc.lr, tc.weight_decay)
    for group in groups:
        group.setdefault("base_lr", group["lr"])
    trainable = [p for g in groups for p in g["params"]]
    # A method may bring its own optimizer (GaLore's projected Adam); everything else is AdamW.
    make_optimizer = getattr(method, "make_optimizer", None) or (
        lambda groups, lr, betas, eps: torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    )
    optimizer = make_optimizer(groups, tc.lr, tc.betas, tc.eps)
    raw_optimizer = optimizer
    if fsdp:  # sharded already; accelerate would wrap it in DDP on top
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)  # without DDP's wrapper: what state dicts are read from
    grad_sync = count_grad_sync_bytes(model)

    start_step, state = 0, {}
    if resume_from:
        state = checkpoint.load(Path(resume_from), accelerator, unwrapped, raw_optimizer, method)
        start_step = state["step"]
    if main and (resume_from or cfg.run.resume == "auto"):
        records.truncate_after(start_step)  # also drops the records of a run killed before its 1st checkpoint
    if main:
        records.write_config({**cfg.model_dump(mode="json"), "total_steps": total_steps}, device)
        summary = method.describe()
        console.print(
            f"[bold]losia[/] {cfg.method.name} on {cfg.model.name_or_path}: "
            f"{summary['trainable_params']:,} trainable of {summary['total_params']:,} params, "
            f"{len(data)} samples ({data.stats.get('n_tokens', '?')} tokens), {total_steps} steps "
            f"-> {run_dir}" + (f" (resumed at step {start_step})" if start_step else "")
        )

    progress = TrainProgress(console, total_steps, start_step, enabled=main)
    # Per-step history survives resume so the report covers the whole run.
    history = state.get("history", {"step_time_s": [], "tokens": [], "loss": []})
    method_time = 0.0
    wall0 = time.perf_counter()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    # SIGUSR1 / SIGTERM (Slurm preemption, time limit): checkpoint at the next step boundary, exit 75.
    with StopRequest().listening() as stop:
        model.train()
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            for group, factor in zip(raw_optimizer.param_groups, method.lr_factors(step, len(groups))):
                group["lr"] = group["base_lr"] * factor
            micro = [
                _micro_batch(data, collate, step * tc.grad_accum + i, tc.micro_batch_size, world, rank, cfg.seed)
                for i in range(tc.grad_accum)
            ]
            local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            counts = torch.tensor([local_tokens, sum(b["input_ids"].numel() for b in micro)], device=device)
            step_targets, step_inputs = (int(x) for x in accelerator.reduce(counts, reduction="sum"))
            loss_sum = torch.zeros((), device=device)
            for batch in micro:
                batch = {k: v.to(device) for k, v in batch.items()}
                labels = batch.pop("labels")
                # accumulate(): no gradient sync (DDP) / no DeepSpeed step until the last micro-batch.
                with accelerator.accumulate(model), autocast:
                    loss = token_loss_sum(model(**batch, use_cache=False).logits, labels)
                    # accelerate (or DeepSpeed) divides by grad_accum and DDP averages over ranks;
                    # undo both so the gradient is the mean over the step's target tokens.
                    accelerator.backward(loss * (tc.grad_accum * world / max(step_targets, 1)))
                loss_sum += loss.detach()
            grad_norm = None
            if tc.max_grad_norm is not None:
                # The norm before clipping; under DeepSpeed only read: it clipped inside its own step.
                grad_norm = _as_float(accelerator.clip_grad_norm_(trainable, tc.max_grad_norm))
            optimizer.step()  # under DeepSpeed a no-op: its step ran in the last backward
            optimizer.zero_grad(set_to_none=True)
            tm = time.perf_counter()
            method.on_step(step, raw_optimizer)
            method_time += time.perf_counter() - tm
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_time = time.perf_counter() - t0
            # One all-reduce for the step's loss and for whether any rank was asked to stop (a signal
            # may reach the ranks at different steps; they must all checkpoint at the same one).
            stop_flag = torch.tensor(float(bool(stop)), device=device)
            loss_total, stops = accelerator.reduce(torch.stack([loss_sum, stop_flag]), reduction="sum")
            step_loss = float(loss_total) / max(step_targets, 1)
            for key, value in (("step_time_s", step_time), ("tokens", step_inputs), ("loss", step_loss)):
                history[key].append(value)
            done = step + 1
            if main and (done % tc.log_every == 0 or done == total_steps):
                metrics = {
                    "step": done,
                    "loss": step_loss,
                    # The run's schedule; LoSiA's per-slot rewarm multipliers are in lr_groups.
                    "lr": tc.lr * schedule.factor(step),
                    "lr_groups": [g["lr"] for g in raw_optimizer.param_groups],
                    "grad_norm": grad_norm,
                    "tokens": step_inputs,
                    "target_tokens": step_targets,
                    "step_time_s": step_time,
                    "tokens_per_s": step_inputs / step_time,
                    "peak_mem_bytes": _peak_memory(device),
                    "epoch": (done * tc.grad_accum - 1) // micro_per_epoch,
                }
                records.metric(metrics)
                progress.update(done, metrics)
            preempted = done < total_steps and bool(stops)
            if preempted or (tc.save_every and done % tc.save_every == 0 and done < total_steps):
                checkpoint.save(
                    run_dir, done, accelerator, unwrapped, raw_optimizer, method,
                    {"history": history}, tc.keep_last_n,
                )
            if preempted:
                progress.close()
                raise Preempted(done)
    progress.close()
    method.finalize(unwrapped)
    sharded = fsdp or cfg.dist.name == "zero3"
    in_sync = sharded or ranks_in_sync(accelerator, unwrapped)
    full_state = checkpoint.whole_state_dict(accelerator, model) if sharded else None
    if main:
        final = method.export(unwrapped)
        with atomic.directory(run_dir / "final", overwrite=True) as tmp:
            method.save(final, tmp, full_state)
            tokenizer.save_pretrained(tmp)
        timings = step_timings(history["step_time_s"], history["tokens"])
        summary = method.describe()
        report = {
            **summary,
            "total_steps": total_steps,
            "step_time_s": {"p50": timings["p50"], "p95": timings["p95"]},
            "tokens_per_s": timings["tokens_per_s"],
            "mfu": _model_flops_utilisation(device, summary["total_params"], timings["tokens_per_s"], world),
            "peak_mem_bytes": _peak_memory(device),
            "relocalization_time_s": getattr(method, "relocalization_time_s", 0.0),
            "num_processes": world,
            "ranks_in_sync": in_sync,
            # Bytes DDP all-reduced per optimizer step (this process's steps; None without DDP).
            "grad_sync_bytes_per_step": grad_sync and grad_sync["bytes"] / max(1, total_steps - start_step),
            "method_step_time_s": method_time,
            "first_loss": history["loss"][0],
            "final_loss": history["loss"][-1],
            "wall_s": time.perf_counter() - wall0,
            "data": data.stats,
        }
        records.write_report(report)
        records.close()
        if cfg.eval.after_train:
            from losia_cli.eval.command import run_eval

            run_eval(final, tokenizer, cfg.eval, run_dir / "eval", {"run_dir": str(run_dir)}, console)
        write_model_card(run_dir / "final", run_dir)  # after eval: the card carries its scores
        console.print(
            f"[green]done[/] {total_steps} steps, loss {report['first_loss']:.4f} -> {report['final_loss']:.4f}, "
            f"p50 {report['step_time_s']['p50']:.2f} s/step -> {run_dir}"
        )
    return run_dir


# Dense bf16 tensor-core peaks (FLOP/s) by GPU name; MFU is reported for these only.
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def _model_flops_utilisation(device, params: int, tokens_per_s: float, world: int) -> float | None:
    """6 N FLOPs per trained token (forward + full backward: the usual model-FLOPs convention, the
    same for every method, so a cheaper backward shows as a higher MFU) over the GPUs' bf16 peak."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in _PEAK_FLOPS.items() if key in name), None)
    return 6 * params * tokens_per_s / (peak * world) if peak else None


def _as_float(value) -> float | None:
    if isinstance(value, DTensor):  # FSDP's norm of sharded gradients
        value = value.full_tensor()
    return None if value is None else float(value)
