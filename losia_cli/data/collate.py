"""Batch collation for the engine's DataLoader (module-level functions: picklable for workers)."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from losia_cli.data.config import DataConfig
from losia_cli.data.dataset import resolve_task
from losia_cli.data.tokenization import IGNORE, special_ids


def pad_batch(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, labels (-100 on pads), attention_mask."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_batch(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows: input_ids, labels, position_ids (0 at every sample start) and NO attention_mask.
    Transformers then builds a block-diagonal causal mask from the position_ids (sdpa/eager) or
    uses varlen kernels (flash-attention). A short row's padding restarts at position 0: it is a
    separate block that no sample attends to and that carries no loss."""
    batch = pad_batch(examples, pad_id)
    width = batch.pop("attention_mask").shape[1]
    position_ids = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        position_ids[row, :n] = torch.tensor(e["position_ids"])
        position_ids[row, n:] = torch.arange(width - n)
    return {**batch, "position_ids": position_ids}


def pad_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Preference pairs as one padded batch of 2B rows, the B chosen then the B rejected sides (one
    forward for both, as TRL's trainers do), plus "reference": each row's reference log-prob when the
    pairs carry one (engine/preference.py)."""
    sides = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    sides += [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples]
    batch = pad_batch(sides, pad_id)
    if "reference" in examples[0]:
        batch["reference"] = torch.tensor([e["reference"][side] for side in (0, 1) for e in examples],
                                          dtype=torch.float64)
    return batch


def make_collator(cfg: DataConfig, tokenizer) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Collator matching build_dataset's output for this config; pads with the tokenizer's pad id
    (EOS when it has none; pads never carry loss, so pad == eos is harmless)."""
    if resolve_task(cfg.components()[0][0]).kind == "preference":
        return partial(pad_pairs, pad_id=special_ids(tokenizer).pad)
    return partial(pack_batch if cfg.packing else pad_batch, pad_id=special_ids(tokenizer).pad)
