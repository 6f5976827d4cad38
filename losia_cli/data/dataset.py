"""build_dataset: source -> template -> tokens + loss mask -> (packing) -> cached TokenizedData."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from losia_cli.data import cache
from losia_cli.data.config import DataConfig
from losia_cli.data.packing import packed_arrays
from losia_cli.data.sources import Source, prepare_rows
from losia_cli.data.tasks import Task, get_task, load_chat_template, load_task
from losia_cli.data.tokenization import IGNORE, Encoder, encode_dataset, special_ids
from losia_cli.errors import DataError


Split = Literal["train", "val"]


class TokenizedData(torch.utils.data.Dataset):
    """Examples {"input_ids": [...], "labels": [...]} (packed: plus "position_ids", restarting at 0
    at every sample), stored as flat arrays + row offsets. `.stats` describes the build.
    Preference pairs also have "rejected_input_ids" and "rejected_labels" (the chosen side is
    input_ids/labels), and with `with_reference` a "reference" [chosen, rejected] log-prob pair."""

    def __init__(self, arrays: dict[str, np.ndarray], stats: dict):
        self.arrays, self.stats = arrays, stats
        self._offsets = arrays["offsets"]
        self._fields = [k for k in ("input_ids", "labels", "position_ids") if k in arrays]
        self.reference: np.ndarray | None = None

    @property
    def pairs(self) -> bool:
        return "rejected_offsets" in self.arrays

    def with_reference(self, reference: np.ndarray) -> TokenizedData:
        """The pairs with their (n, 2) reference log-probs attached (engine/preference.py)."""
        if len(reference) != len(self):
            raise ValueError(f"{len(reference)} reference rows for {len(self)} pairs")
        self.reference = reference
        return self

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        example = {k: self.arrays[k][start:end].tolist() for k in self._fields}
        if self.pairs:
            start, end = int(self.arrays["rejected_offsets"][i]), int(self.arrays["rejected_offsets"][i + 1])
            example.update({k: self.arrays[k][start:end].tolist() for k in ("rejected_input_ids", "rejected_labels")})
        if self.reference is not None:
            example["reference"] = self.reference[i].tolist()
        return example

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example (for length-grouped sampling or budgeting)."""
        return np.diff(self._offsets)


def resolve_task(cfg: DataConfig) -> Task:
    return load_task(cfg.template, cfg.task) if cfg.template else get_task(cfg.task)


def make_encoder(cfg: DataConfig, task: Task, source: Source, tokenizer, rows: np.ndarray | None = None) -> Encoder:
    """Encoder for one source; `rows`: the source row of each row it is given (for error
    locations), None when it is given the source's rows in order."""
    where = source.where if rows is None else partial(_where_selected, source, rows)
    return Encoder(task, tokenizer, where, load_chat_template(cfg.chat_template), special_ids(tokenizer),
                   cfg.max_length, cfg.train_on_input, cfg.overlong)


def _where_selected(source: Source, rows: np.ndarray, i: int) -> str:
    return source.where(int(rows[i]))


def split_parts(cfg: DataConfig, split: Split) -> list[tuple[DataConfig, float]]:
    """(single-source config, weight) of what `split` reads: the train sources, or for val each
    source's val_split rows, or the val_source."""
    if split == "val" and cfg.val_source is not None:
        val = cfg.model_copy(update={"source": cfg.val_source, "sources": None, "val_source": None})
        return [(val.named("data.val_source"), 1.0)]
    return cfg.components()


def select_rows(cfg: DataConfig, n_rows: int, split: Split) -> np.ndarray:
    """Indices of a source's rows in `split`: the `max_samples` subset (a `shuffle_seed`
    permutation, as `Dataset.shuffle(seed)`), then `val_split` of it held out for val."""
    rows = np.arange(n_rows)
    if cfg.max_samples is not None and cfg.max_samples < n_rows:
        rows = np.random.default_rng(cfg.shuffle_seed).permutation(n_rows)[: cfg.max_samples]
    if cfg.val_split is None:
        return rows
    n_val = round(len(rows) * cfg.val_split)
    if not 0 < n_val < len(rows):
        raise DataError(f"data.val_split={cfg.val_split} of {len(rows)} rows leaves an empty "
                        f"{'validation' if n_val == 0 else 'training'} set")
    held = np.zeros(len(rows), dtype=bool)
    held[np.random.default_rng([cfg.shuffle_seed, 1]).permutation(len(rows))[:n_val]] = True
    return rows[held if split == "val" else ~held]


def mixture_order(sizes: list[int], weights: list[float], seed: int) -> np.ndarray:
    """Indices into the concatenated samples of the sources: source i contributes its share of
    sum(sizes) by weight (a whole pass per repetition, then a seeded subset), in seeded order."""
    total, p = sum(sizes), np.asarray(weights) / sum(weights)
    counts = np.floor(p * total).astype(int)
    counts[np.argsort(-(p * total - counts), kind="stable")[: total - counts.sum()]] += 1  # sum to total
    rng = np.random.default_rng([seed, 2])
    picks, offset = [], 0
    for size, count in zip(sizes, counts):
        passes = [rng.permutation(size) for _ in range(-(-count // size))]
        picks.append(offset + np.concatenate(passes or [np.zeros(0, int)])[:count])
        offset += size
    picks = np.concatenate(picks)
    return picks[rng.permutation(len(picks))]


def _encode_source(cfg: DataConfig, tokenizer, split: Split) -> tuple[list, dict]:
    """Samples (input_ids, labels) of one source's rows in `split`, and counts."""
    task, source = resolve_task(cfg), Source(cfg)
    rows = prepare_rows(cfg, source, task.fields, task.path)
    selected = select_rows(cfg, len(rows), split)
    if len(selected) < len(rows):
        rows = rows.select(selected, keep_in_memory=True)
    encoder = make_encoder(cfg, task, source, tokenizer, selected)
    samples, counts = [], {"n_rows": len(rows), "n_dropped_overlong": 0, "n_truncated": 0}
    for chunk, dropped, truncated in encode_dataset(encoder, rows, cfg.num_workers):
        samples += chunk
        counts["n_dropped_overlong"] += dropped
        counts["n_truncated"] += truncated
    return samples, counts


def _key(cfg: DataConfig, parts: list[tuple[DataConfig, float]], tokenizer, split: Split) -> str:
    described = []
    for part, weight in parts:
        task = resolve_task(part)
        described.append({"task": task.name, "template": task.text, "source": Source(part).fingerprint(),
                          "column_map": part.column_map, "weight": weight})
    return cache.cache_key({
        "tokenizer": cache.tokenizer_fingerprint(tokenizer),
        "parts": described,
        "split": split,
        "chat_template": load_chat_template(cfg.chat_template),
        "max_length": cfg.max_length,
        "packing": cfg.packing,
        "train_on_input": cfg.train_on_input,
        "overlong": cfg.overlong,
        "max_samples": cfg.max_samples,
        "val_split": cfg.val_split,
        "shuffle_seed": cfg.shuffle_seed if cfg.max_samples or cfg.val_split or cfg.sources else None,
    })


def build_dataset(cfg: DataConfig, tokenizer, *, cache_dir: Path | None, split: Split = "train") -> TokenizedData | None:
    """Tokenized (and, with cfg.packing, packed) data of `split`, from the cache when an entry
    with the same key exists. `split="val"`: the validation set (None when the config has no
    val_split or val_source). A mixture (`sources`) is mixed for train; its val set is each
    source's held-out rows. Raises DataError on any problem with the data; nothing is cached then."""
    if split == "val" and cfg.val_split is None and cfg.val_source is None:
        return None
    parts = split_parts(cfg, split)
    key = _key(cfg, parts, tokenizer, split)
    path = Path(cache_dir) / f"{cfg.task}-{split}-{key[:20]}" if cache_dir is not None else None
    if path is not None and (hit := cache.load(path)) is not None:
        arrays, meta = hit
        return TokenizedData(arrays, {**meta["stats"], "cache_hit": True, "cache_path": str(path)})

    encoded = [_encode_source(part, tokenizer, split) for part, _ in parts]
    for (part, _), (part_samples, _) in zip(parts, encoded):
        if not part_samples:
            raise DataError(f"{part.source}: every sample is longer than max_length={cfg.max_length} (overlong={cfg.overlong})")
    samples = [sample for part_samples, _ in encoded for sample in part_samples]
    stats = {k: sum(counts[k] for _, counts in encoded) for k in encoded[0][1]}
    if cfg.sources is not None and split == "train":
        sizes = [len(part_samples) for part_samples, _ in encoded]
        order = mixture_order(sizes, [weight for _, weight in parts], cfg.shuffle_seed)
        samples = [samples[i] for i in order]
        taken = np.bincount(np.searchsorted(np.cumsum(sizes), order, side="right"), minlength=len(sizes))
        stats["mixture"] = [[part.source, int(n)] for (part, _), n in zip(parts, taken)]
    arrays, stats = _flatten(samples, stats, cfg)
    if path is not None:
        cache.save(path, arrays, {"stats": stats, "task": cfg.task, "split": split, "config": cfg.model_dump()})
    return TokenizedData(arrays, {**stats, "cache_hit": False, "cache_path": str(path) if path else None})


def _flatten(samples: list, stats: dict, cfg: DataConfig) -> tuple[dict[str, np.ndarray], dict]:
    """Flat arrays + offsets of the samples (packed with cfg.packing), and their statistics.
    Preference pairs (4-tuples) keep the rejected side in rejected_* arrays."""
    arrays = _flat([sample[:2] for sample in samples])
    if len(samples[0]) == 4:
        rejected = _flat([sample[2:] for sample in samples])
        arrays.update({f"rejected_{k}": v for k, v in rejected.items()})
    offsets = arrays["offsets"]
    stats = {**stats, "n_samples": len(samples), "n_tokens": int(offsets[-1]),
             "n_target_tokens": int((arrays["labels"] != IGNORE).sum())}
    if cfg.packing:
        arrays = packed_arrays(arrays["input_ids"], arrays["labels"], offsets, cfg.max_length)
        stats["n_packed_rows"] = len(arrays["offsets"]) - 1
        stats["packing_fill"] = round(stats["n_tokens"] / (stats["n_packed_rows"] * cfg.max_length), 4)
    return arrays, stats


def _flat(samples: list) -> dict[str, np.ndarray]:
    lengths = [len(ids) for ids, _ in samples]
    return {"input_ids": np.concatenate([ids for ids, _ in samples]),
            "labels": np.concatenate([labels for _, labels in samples]),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
