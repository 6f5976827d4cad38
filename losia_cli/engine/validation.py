"""Validation: the mean target-token loss of a held-out set, early stopping and the best checkpoint."""

from __future__ import annotations

import torch

from losia_cli.engine.step import token_loss_sum


@torch.no_grad()
def mean_target_loss(model, data, collate, batch_size: int, n: int | None = None) -> float:
    """Mean loss over the target tokens of the first n samples of `data` (all of them when None)."""
    device = next(model.parameters()).device
    n = len(data) if n is None else min(n, len(data))
    was_training = model.training
    model.eval()
    total, targets = 0.0, 0
    for start in range(0, n, batch_size):
        rows = [data[i] for i in range(start, min(n, start + batch_size))]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        labels = batch.pop("labels")
        total += token_loss_sum(model(**batch, use_cache=False).logits, labels).item()
        targets += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
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
