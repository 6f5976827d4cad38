"""Best-fit packing of samples into rows of at most `max_length` tokens.

Each sample goes to the open row with the least room that still fits it (else a new row), so a
sample is never split across rows; samples are already within max_length (overlong policy first).
"""

from __future__ import annotations

import bisect

import numpy as np


def pack_rows(lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """Sample indices per row, in the order they were placed."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index) of rows that are not full, sorted
    for i, n in enumerate(lengths.tolist()):
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, row = room.pop(at)
        else:
            free, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, row))
    return rows


def packed_arrays(samples_ids: np.ndarray, samples_labels: np.ndarray, offsets: np.ndarray, max_length: int) -> dict:
    """Flat arrays of packed rows: input_ids, labels, position_ids (restarting at every sample) and
    row offsets."""
    lengths = np.diff(offsets)
    rows = pack_rows(lengths, max_length)
    order = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=len(lengths))
    gather = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in order]) if len(order) else np.zeros(0, np.int64)
    positions = np.concatenate([np.arange(lengths[i], dtype=np.int32) for i in order]) if len(order) else np.zeros(0, np.int32)
    row_lengths = np.fromiter((int(lengths[row].sum()) for row in rows), dtype=np.int64, count=len(rows))
    return {
        "input_ids": samples_ids[gather],
        "labels": samples_labels[gather],
        "position_ids": positions,
        "offsets": np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64),
    }
