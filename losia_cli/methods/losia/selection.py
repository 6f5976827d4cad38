"""Choosing the block rows R and columns C (docs/method.md 3.4 and 3.5).

All index sets come back sorted ascending and unique: the autograd function relies on it (|C| = n means
C = 0..n-1), and sorted gathers read memory in order. Ties are broken towards the lower index by a stable
sort, so every DDP rank that sees the same score picks the same block.
"""

from __future__ import annotations

import torch

from .importance import at_least_fp32

CANDIDATES = ("independent", "rows_first", "cols_first")


def top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, lower index first among equals, returned sorted ascending."""
    order = torch.sort(values, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def block_mass(score: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> float:
    return float(score.index_select(0, rows).index_select(1, cols).sum())


def candidate(score: torch.Tensor, k_rows: int, k_cols: int, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One greedy candidate: independent row/column sums, or rows (columns) first, then the other
    restricted to them."""
    if how == "independent":
        return top_k(score.sum(1), k_rows), top_k(score.sum(0), k_cols)
    if how == "rows_first":
        rows = top_k(score.sum(1), k_rows)
        return rows, top_k(score.index_select(0, rows).sum(0), k_cols)
    if how == "cols_first":
        cols = top_k(score.sum(0), k_cols)
        return top_k(score.index_select(1, cols).sum(1), k_rows), cols
    raise ValueError(f"unknown selection {how!r}")


def select_block(
    score: torch.Tensor, k_rows: int, k_cols: int, how: str = "best"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(rows, cols, block mass) for an (m, n) score; "best" keeps the candidate with the largest mass
    (the first of independent, rows_first, cols_first on a tie)."""
    score = score.to(at_least_fp32(score.dtype))
    names = CANDIDATES if how == "best" else (how,)
    best = None
    for name in names:
        rows, cols = candidate(score, k_rows, k_cols, name)
        mass = block_mass(score, rows, cols)
        if best is None or mass > best[2]:
            best = (rows, cols, mass)
    return best


def random_block(
    m: int, n: int, k_rows: int, k_cols: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's initial subnet: random rows and columns (from a generator seeded by the run seed,
    identical on every rank)."""
    rows = torch.randperm(m, generator=generator)[:k_rows]
    cols = torch.randperm(n, generator=generator)[:k_cols]
    return torch.sort(rows).values, torch.sort(cols).values


def magnitude_block(weight: torch.Tensor, k_rows: int, k_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns with the largest |W| sums."""
    magnitude = weight.detach().to(at_least_fp32(weight.dtype)).abs()
    return top_k(magnitude.sum(1), k_rows), top_k(magnitude.sum(0), k_cols)
