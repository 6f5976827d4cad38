"""Tokenized-data cache: one folder per key, written atomically (losia_cli.atomic).

The key hashes everything that can change the tokens: the tokenizer (vocabulary, merges,
normalizer, special tokens, chat template), the template file's text, the task, the source's
content (file hash, or hub id + config + split + revision + dataset fingerprint), the data settings
and CACHE_VERSION. Bump CACHE_VERSION whenever the tokenization code changes its output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from losia_cli import atomic

CACHE_VERSION = 1
_META = "meta.json"


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # The serialized Rust tokenizer covers vocab, merges, normalizer and pre-tokenizer; slow
    # tokenizers fall back to the vocabulary.
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest.update(vocab.encode())
    digest.update(json.dumps([
        type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer),
        tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
        tokenizer("x")["input_ids"], getattr(tokenizer, "chat_template", None),
    ], default=str).encode())
    return digest.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()


def load(path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """Arrays (memory-mapped) and meta of a complete cache entry, or None."""
    meta_file = path / _META
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    return arrays, meta


def save(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write a cache entry atomically; when processes race to build it, the first to finish wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.directory(path, shared=True) as tmp:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
        (tmp / _META).write_text(json.dumps({**meta, "arrays": sorted(arrays)}, indent=1, default=str))
