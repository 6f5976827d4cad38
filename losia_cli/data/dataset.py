"""build_dataset: source -> template -> tokens + loss mask -> (packing) -> cached TokenizedData."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from losia_cli.data import cache
from losia_cli.data.config import DataConfig
from losia_cli.data.errors import DataError
from losia_cli.data.packing import packed_arrays
from losia_cli.data.sources import Source, prepare_rows
from losia_cli.data.tasks import Task, get_task, load_task
from losia_cli.data.tokenization import IGNORE, Encoder, encode_dataset, special_ids


class TokenizedData(torch.utils.data.Dataset):
    """Examples {"input_ids": [...], "labels": [...]} (packed: plus "position_ids", restarting at 0
    at every sample), stored as flat arrays + row offsets. `.stats` describes the build."""

    def __init__(self, arrays: dict[str, np.ndarray], stats: dict):
        self.arrays, self.stats = arrays, stats
        self._offsets = arrays["offsets"]
        self._fields = [k for k in ("input_ids", "labels", "position_ids") if k in arrays]

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        return {k: self.arrays[k][start:end].tolist() for k in self._fields}

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example (for length-grouped sampling or budgeting)."""
        return np.diff(self._offsets)


def resolve_task(cfg: DataConfig) -> Task:
    return load_task(cfg.template, cfg.task) if cfg.template else get_task(cfg.task)


def make_encoder(cfg: DataConfig, task: Task, source: Source, tokenizer) -> Encoder:
    return Encoder(task, tokenizer, source.label, special_ids(tokenizer), cfg.max_length, cfg.train_on_input, cfg.overlong)


def build_dataset(cfg: DataConfig, tokenizer, *, cache_dir: Path | None) -> TokenizedData:
    """Tokenized (and, with cfg.packing, packed) training data, from the cache when an entry with
    the same key exists. Raises DataError on any problem with the data; nothing is cached then."""
    task = resolve_task(cfg)
    source = Source(cfg)
    key = cache.cache_key({
        "tokenizer": cache.tokenizer_fingerprint(tokenizer),
        "task": task.name,
        "template": task.text,
        "source": source.fingerprint(),
        "column_map": cfg.column_map,
        "max_length": cfg.max_length,
        "packing": cfg.packing,
        "train_on_input": cfg.train_on_input,
        "overlong": cfg.overlong,
        "max_samples": cfg.max_samples,
        "shuffle_seed": cfg.shuffle_seed if cfg.max_samples else None,
    })
    path = Path(cache_dir) / f"{task.name}-{key[:20]}" if cache_dir is not None else None
    if path is not None and (hit := cache.load(path)) is not None:
        arrays, meta = hit
        return TokenizedData(arrays, {**meta["stats"], "cache_hit": True, "cache_path": str(path)})

    rows = prepare_rows(cfg, source, task.fields, task.path)
    encoder = make_encoder(cfg, task, source, tokenizer)
    ids, labels, lengths = [], [], []
    dropped = truncated = 0
    for samples, n_dropped, n_truncated in encode_dataset(encoder, rows, cfg.num_workers):
        dropped += n_dropped
        truncated += n_truncated
        for sample_ids, sample_labels in samples:
            ids.append(sample_ids)
            labels.append(sample_labels)
            lengths.append(len(sample_ids))
    if not ids:
        raise DataError(f"{source.label}: every sample is longer than max_length={cfg.max_length} (overlong={cfg.overlong})")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arrays = {"input_ids": np.concatenate(ids), "labels": np.concatenate(labels), "offsets": offsets}
    stats = {
        "n_rows": len(rows),
        "n_samples": len(ids),
        "n_tokens": int(offsets[-1]),
        "n_target_tokens": int((arrays["labels"] != IGNORE).sum()),
        "n_dropped_overlong": dropped,
        "n_truncated": truncated,
    }
    if cfg.packing:
        arrays = packed_arrays(arrays["input_ids"], arrays["labels"], offsets, cfg.max_length)
        stats["n_packed_rows"] = len(arrays["offsets"]) - 1
        stats["packing_fill"] = round(stats["n_tokens"] / (stats["n_packed_rows"] * cfg.max_length), 4)
    if path is not None:
        cache.save(path, arrays, {"stats": stats, "task": task.name, "source": source.label, "config": cfg.model_dump()})
    return TokenizedData(arrays, {**stats, "cache_hit": False, "cache_path": str(path) if path else None})
