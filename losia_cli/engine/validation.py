"""Validation: the mean target-token loss of a held-out set, early stopping and the best checkpoint."""

from __future__ import annotations

import math

import torch

from losia_cli.engine.step import token_loss_sum


@torch.no_grad()
def mean_target_loss(model, data, collate, batch_size: int, n: int | None = None, rank: int = 0,
                     world: int = 1) -> float:
    """Mean loss over the target tokens of the first n samples of `data` (all of them when None).

    Over `world` processes (each calls it with its `rank`) each takes every world-th batch and the
    token-weighted sums are all-reduced: one process's value, for a world-th of the work."""
    device = next(model.parameters()).device
    n = len(data) if n is None else min(n, len(data))
    starts = range(0, n, batch_size)
    mine = starts[rank::world]
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, target tokens
    # As many forwards on every rank: under FSDP and ZeRO-3 a forward is collective (it gathers the
    # shards), so a rank short of a batch runs one more and drops its result.
    for i in range(math.ceil(len(starts) / world)):
        start = mine[i] if i < len(mine) else 0
        rows = [data[j] for j in range(start, min(n, start + batch_size))]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        labels = batch.pop("labels")
        loss = token_loss_sum(model(**batch, use_cache=False).logits, labels)
        if i < len(mine):
            sums += torch.stack([loss.double(), (labels[:, 1:] != -100).sum().double()])
    if world > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    total, targets = sums.tolist()
    return total / max(targets, 1)


def validations_since_best(val_losses: list[list[float]]) -> int:
    """How many validations ([step, loss] rows) came after the lowest loss so far."""
    losses = [loss for _, loss in val_losses]
    return len(losses) - 1 - losses.index(min(losses))


def save_interval(save_every: int | None, total_steps: int, dist: str) -> int | None:
    """Checkpoints are on by default, so `run.resume=auto` always has one: every fifth of the run,
    at least 10 and at most 500 steps apart (a 30-step demo writes two). zero3 cannot save yet."""
    if dist == "zero3":
        return None
    return save_every or min(500, max(10, total_steps // 5))
