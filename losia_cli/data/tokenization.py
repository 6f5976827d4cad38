"""Rendered rows -> token ids + labels (the loss mask), in one or several processes.

Prompt and response are tokenized separately (no special tokens) and concatenated:
    [BOS per tokenizer] + prompt + response + [EOS]
rather than tokenizing the full text and locating the boundary, because
- the mask boundary is then exact by construction (a BPE merge across the boundary cannot shift it);
- the prompt tokens trained on are exactly the tokens an evaluator feeds when it tokenizes the prompt
  alone and generates from there, and the response tokens are what the model must then produce;
- multi-turn chat is the same thing with more pieces; and it is what the reference does (7.3).
Templates keep the boundary natural for that (prompt ends before a space or after a newline).

Labels follow the Hugging Face convention (the model shifts them): -100 marks positions without
loss. The first token of every sample is always -100 (nothing predicts it; in a packed row this also
stops one sample's last token from being trained to predict the next sample's first). EOS is always a
target, even where pad == eos. Text rendered from data is tokenized with `split_special_tokens`, so a
literal "<|im_end|>" in a dataset is text, not a control token; chat-template output is not (its
special tokens are meant).
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from losia_cli.data.tasks import Task
from losia_cli.errors import DataError

IGNORE = -100
CHUNK_ROWS = 512


@dataclass(frozen=True)
class Specials:
    bos: tuple[int, ...]  # what the tokenizer puts before text (BOS), empty when it adds nothing
    eos: int
    pad: int


def special_ids(tokenizer) -> Specials:
    """BOS/EOS/pad by the tokenizer's own convention: BOS is whatever `tokenizer(text)` puts before
    the text (nothing for SmolLM2/Qwen, <s> for Llama-2, <bos> for Gemma)."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; cannot end samples")
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Specials(bos=tuple(full[:start]), eos=tokenizer.eos_token_id, pad=pad)


@dataclass(frozen=True)
class Encoder:
    """Everything a worker needs to turn rows into samples."""

    task: Task
    tokenizer: object
    where: Callable[[int], str]  # row index -> "file:line" (or "source row N") for error messages
    chat_template: str | None  # overrides the tokenizer's for chat tasks
    specials: Specials
    max_length: int
    train_on_input: bool
    overlong: str

    def encode(self, rows: list[dict], first_row: int = 0) -> tuple[list[tuple[np.ndarray, ...]], int, int]:
        """Samples (input_ids, labels) for the rows that survive the overlong policy, plus the
        number dropped and truncated. `first_row`: index of rows[0] in the source, for errors.
        A preference task's sample is a pair: (chosen ids, chosen labels, rejected ids, rejected
        labels), dropped whole when either side is."""
        pieces = []
        for i, row in enumerate(rows):
            try:
                if self.task.kind == "preference":
                    pieces.append(self.task.pair_segments(row, self.tokenizer, self.chat_template))
                else:
                    pieces.append([self.task.train_segments(row, self.tokenizer, self.chat_template)])
            except DataError as e:
                raise DataError(f"{self.where(first_row + i)}: {e}") from None
        texts = [text for sides in pieces for segments in sides for text, _ in segments]
        ids = self.tokenizer(
            texts, add_special_tokens=False, split_special_tokens=not self.task.chat_rendered
        )["input_ids"] if texts else []
        samples, dropped, truncated, k = [], 0, 0, 0
        for sides in pieces:
            assembled = []
            for segments in sides:
                assembled.append(self._assemble(segments, ids[k : k + len(segments)]))
                k += len(segments)
            if self.task.kind == "text":  # pre-training text: a long document is cut, not lost
                samples += self._pieces(assembled[0])
                continue
            fitted = [self._fit(sample) for sample in assembled]
            if any(sample is None for sample in fitted):
                dropped += 1
                continue
            truncated += any(len(a[0]) > len(f[0]) for a, f in zip(assembled, fitted))
            samples.append(tuple(array for sample in fitted for array in sample))
        return samples, dropped, truncated

    def _fit(self, sample: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
        """The sample within max_length by the overlong policy; None when it is dropped."""
        if len(sample[0]) <= self.max_length:
            return sample
        if self.overlong == "drop":
            return None
        sample = (sample[0][: self.max_length], sample[1][: self.max_length])
        return sample if (sample[1] != IGNORE).any() else None  # None: nothing left to learn from

    def _pieces(self, sample: tuple[np.ndarray, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """max_length pieces of a document; each piece's first token is a target-less context."""
        out = []
        for start in range(0, len(sample[0]), self.max_length):
            ids, labels = sample[0][start : start + self.max_length], sample[1][start : start + self.max_length].copy()
            labels[0] = IGNORE
            if (labels != IGNORE).any():
                out.append((ids, labels))
        return out

    def _assemble(self, segments, encoded) -> tuple[np.ndarray, np.ndarray]:
        bos = list(self.specials.bos)
        if bos and encoded and encoded[0][: len(bos)] == bos:  # chat templates often write BOS themselves
            bos = []
        eos = self.specials.eos
        input_ids, labels = list(bos), [IGNORE] * len(bos)
        for (_, is_target), piece in zip(segments, encoded):
            input_ids += piece
            if self.train_on_input:
                labels += piece
            elif is_target:
                # A chat turn is a target up to its end-of-turn EOS; the template's separator
                # after it ("\n") is formatting, not something to learn.
                end = len(piece) - piece[::-1].index(eos) if eos in piece else len(piece)
                labels += piece[:end] + [IGNORE] * (len(piece) - end)
            else:
                labels += [IGNORE] * len(piece)
        last = encoded[-1] if segments[-1][1] else []
        if eos in last:  # a chat template already ended the last turn with EOS: end the sample there
            tail = last[::-1].index(eos)
            del input_ids[len(input_ids) - tail :], labels[len(labels) - tail :]
        else:
            input_ids.append(eos)
            labels.append(eos)
        labels[0] = IGNORE
        return np.asarray(input_ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)


_WORKER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _WORKER
    _WORKER = encoder


def _encode_chunk(chunk: tuple[int, list[dict]]):
    first_row, rows = chunk
    return _WORKER.encode(rows, first_row)


def _chunks(dataset, size: int):
    for first_row, batch in zip(range(0, len(dataset), size), dataset.iter(batch_size=size)):
        keys = list(batch)
        yield first_row, [dict(zip(keys, values)) for values in zip(*batch.values())]


def encode_dataset(encoder: Encoder, dataset, num_workers: int = 1):
    """Encode every row; yields the results of `Encoder.encode` chunk by chunk, in order."""
    if num_workers <= 1:
        for first_row, rows in _chunks(dataset, CHUNK_ROWS):
            yield encoder.encode(rows, first_row)
        return
    # Forked workers inherit the encoder (no pickling of tokenizer/templates); the Rust tokenizer's
    # own thread pool would only oversubscribe the cores next to N processes.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(num_workers, initializer=_init_worker, initargs=(encoder,)) as pool:
        yield from pool.imap(_encode_chunk, _chunks(dataset, CHUNK_ROWS), chunksize=1)
