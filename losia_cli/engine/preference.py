"""Preference objectives (train.objective): DPO and SimPO on (chosen, rejected) pairs.

A preference batch holds 2B rows, the B chosen sequences then the B rejected ones (data/collate.py),
and for DPO `reference`: each row's summed target log-prob under the starting weights, computed once
before the first step (reference_logps) and cached with the tokenized data, so no reference model is
held while training.

    DPO (Rafailov et al. 2023), sigmoid loss, cDPO label smoothing eps:
        z = beta * ((logp_c - ref_c) - (logp_r - ref_r))
        loss = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)
    SimPO (Meng et al. 2024), reference-free, length-normalised log-probs:
        z = beta * (logp_c / n_c - logp_r / n_r) - gamma
        loss = the same in z

These are the formulas of TRL's DPOTrainer (loss_type=sigmoid) and CPOTrainer (loss_type=simpo);
tests/test_preference.py checks them against TRL on the same log-probs.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from losia_cli.data import cache

OBJECTIVES = ("sft", "dpo", "simpo")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's target tokens, number of target tokens), per row."""
    shifted = labels[:, 1:]
    logits = logits[:, :-1].flatten(0, 1)
    # fp32 at least (bf16 log-softmax loses the margins); fp64 stays fp64 for exact comparisons.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    token_logps = -F.cross_entropy(logits, shifted.flatten(), ignore_index=-100, reduction="none").view(shifted.shape)
    return token_logps.sum(-1), (shifted != -100).sum(-1)


def _sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO losses and the implicit rewards beta * (logp - ref) of both sides."""
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return _sigmoid_loss(chosen_rewards - rejected_rewards, label_smoothing), chosen_rewards, rejected_rewards


def simpo_loss(chosen_avg, rejected_avg, beta: float, gamma: float, label_smoothing: float = 0.0):
    """Per-pair SimPO losses on length-normalised log-probs, and the rewards beta * avg logp."""
    chosen_rewards, rejected_rewards = beta * chosen_avg, beta * rejected_avg
    return (_sigmoid_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing),
            chosen_rewards, rejected_rewards)


@dataclass
class Objective:
    """The preference loss of train.objective, and its running metric sums between log rows."""

    name: str  # dpo | simpo
    beta: float
    label_smoothing: float
    gamma: float
    sums: torch.Tensor | None = None  # pairs, chosen reward, rejected reward, correct pairs

    @classmethod
    def of(cls, tc) -> Objective | None:
        """The objective of a TrainConfig; None for sft (the engine's token loss)."""
        if tc.objective == "sft":
            return None
        return cls(tc.objective, tc.beta, tc.label_smoothing, tc.simpo_gamma)

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo"

    def pair_terms(self, logits, labels, reference=None):
        """(per-pair losses, chosen rewards, rejected rewards) of a 2B-row preference batch."""
        logps, counts = sequence_logps(logits, labels)
        chosen, rejected = logps.chunk(2)
        if self.name == "simpo":
            n_chosen, n_rejected = counts.clamp(min=1).chunk(2)
            return simpo_loss(chosen / n_chosen, rejected / n_rejected, self.beta, self.gamma, self.label_smoothing)
        ref_chosen, ref_rejected = reference.to(logps.dtype).chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing)

    def loss_sum(self, logits, labels, reference=None) -> torch.Tensor:
        """Summed pair loss of the batch (the loop divides by the step's pairs); the metrics accumulate."""
        losses, chosen, rejected = self.pair_terms(logits, labels, reference)
        sums = pair_sums(chosen.detach(), rejected.detach())
        self.sums = sums if self.sums is None else self.sums + sums
        return losses.sum()

    def read(self, accelerator) -> dict:
        """The metrics since the last read, over all ranks (a collective: every rank calls it)."""
        sums = accelerator.reduce(self.sums, reduction="sum") if accelerator.num_processes > 1 else self.sums
        self.sums = None
        return pair_metrics(sums.tolist())


def pair_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.tensor(float(len(chosen_rewards)), dtype=torch.float64, device=chosen_rewards.device),
                        chosen_rewards.double().sum(), rejected_rewards.double().sum(),
                        (chosen_rewards > rejected_rewards).double().sum()])


def pair_metrics(sums: list[float], prefix: str = "") -> dict:
    """Mean chosen/rejected reward, margin and preference accuracy from pair_sums."""
    pairs, chosen, rejected, correct = sums
    pairs = max(pairs, 1)
    return {f"{prefix}rewards_chosen": chosen / pairs, f"{prefix}rewards_rejected": rejected / pairs,
            f"{prefix}reward_margin": (chosen - rejected) / pairs, f"{prefix}pref_accuracy": correct / pairs}


# -- the reference pass --------------------------------------------------------------------------
def weights_fingerprint(model: torch.nn.Module, extra: dict) -> str:
    """Hash of the starting weights (and how they are run: dtype, precision, attention), which key
    the cached reference log-probs next to the tokenized data."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def reference_logps(model, data, collate, batch_size: int, autocast) -> np.ndarray:
    """(n, 2) summed target log-probs of every pair's (chosen, rejected) under `model`, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in collate([data[i] for i in range(start, min(len(data), start + batch_size))]).items()}
        labels = batch.pop("labels")
        with autocast:
            logps, _ = sequence_logps(model(**batch, use_cache=False).logits, labels)
        chosen, rejected = logps.double().chunk(2)
        out.append(torch.stack([chosen, rejected], 1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 2))


def attach_reference(model, datasets: list, collate, batch_size: int, autocast, how: dict) -> dict:
    """Attach to each dataset of pairs its reference log-probs under `model` (the starting weights):
    from the cache entry next to its tokenized data, keyed by the weights and `how` they are run,
    else computed now and stored there (a resumed run finds them). What it took, for report.json."""
    t0 = time.perf_counter()
    key, computed = weights_fingerprint(model, how)[:20], False
    for data in datasets:
        if data is None:
            continue
        path = data.stats.get("cache_path") and Path(f"{data.stats['cache_path']}-ref-{key}")
        hit = cache.load(path) if path else None
        if hit is None:
            reference = reference_logps(model, data, collate, batch_size, autocast)
            computed = True
            if path:
                cache.save(path, {"reference": reference}, {"model": how})
        else:
            reference = np.asarray(hit[0]["reference"])
        data.with_reference(reference)
    return {"computed": computed, "seconds": time.perf_counter() - t0, "key": key}


@torch.no_grad()
def validate_pairs(model, data, collate, batch_size: int, objective: Objective, rank: int = 0, world: int = 1) -> dict:
    """Mean pair loss and the reward metrics of held-out pairs; every rank takes every world-th
    batch and the sums are all-reduced (as engine/validation.mean_target_loss)."""
    device = next(model.parameters()).device
    starts = range(0, len(data), batch_size)
    mine = starts[rank::world]
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, then pair_sums
    for i in range(math.ceil(len(starts) / world)):  # as many forwards on every rank (FSDP gathers)
        start = mine[i] if i < len(mine) else 0
        batch = {k: v.to(device) for k, v in collate([data[j] for j in range(start, min(len(data), start + batch_size))]).items()}
        labels, reference = batch.pop("labels"), batch.pop("reference", None)
        losses, chosen, rejected = objective.pair_terms(model(**batch, use_cache=False).logits, labels, reference)
        if i < len(mine):
            sums += torch.cat([losses.double().sum()[None], pair_sums(chosen, rejected)])
    if world > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    loss, *rest = sums.tolist()
    return {"val_loss": loss / max(rest[0], 1), **pair_metrics(rest, prefix="val_")}
