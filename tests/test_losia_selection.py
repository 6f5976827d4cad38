"""Block selection and importance scores on small hand-made tensors (docs/method.md 3.3-3.5)."""

from __future__ import annotations

import pytest
import torch

from losia_cli.methods.losia.importance import Scorer, sensitivity
from losia_cli.methods.losia.selection import candidate, magnitude_block, random_block, select_block, top_k

# Rows 0-1 have the largest sums and their mass sits in columns 2-3; the largest column sums (0-1) come
# from rows 2-4. Rows-first finds the 24-mass block, columns-first only 20, independent 0.
ROWS_WIN = torch.tensor(
    [
        [0.0, 0.0, 6.0, 6.0],
        [0.0, 0.0, 6.0, 6.0],
        [5.0, 5.0, 0.0, 0.0],
        [5.0, 5.0, 0.0, 0.0],
        [5.0, 5.0, 0.0, 0.0],
    ]
)


def indices(rows, cols):
    return rows.tolist(), cols.tolist()


def test_candidates_on_a_hand_matrix():
    assert indices(*candidate(ROWS_WIN, 2, 2, "independent")) == ([0, 1], [0, 1])
    assert indices(*candidate(ROWS_WIN, 2, 2, "rows_first")) == ([0, 1], [2, 3])
    assert indices(*candidate(ROWS_WIN, 2, 2, "cols_first")) == ([2, 3], [0, 1])


def test_best_block_mass_picks_rows_first():
    rows, cols, mass = select_block(ROWS_WIN, 2, 2)
    assert indices(rows, cols) == ([0, 1], [2, 3]) and mass == 24.0


def test_best_block_mass_picks_cols_first():
    rows, cols, mass = select_block(ROWS_WIN.t(), 2, 2)
    assert indices(rows, cols) == ([2, 3], [0, 1]) and mass == 24.0


def test_forced_strategy_and_ties():
    rows, cols, mass = select_block(ROWS_WIN, 2, 2, "independent")
    assert indices(rows, cols) == ([0, 1], [0, 1]) and mass == 0.0
    # A flat score: every candidate ties, the lowest indices win (same pick on every rank).
    assert indices(*select_block(torch.ones(4, 5), 2, 3)[:2]) == ([0, 1], [0, 1, 2])


def test_top_k_is_stable_and_sorted():
    assert top_k(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 2).tolist() == [1, 2]
    assert top_k(torch.tensor([5.0, 1.0, 7.0, 6.0]), 3).tolist() == [0, 2, 3]


def test_random_block_is_seeded_sorted_and_unique():
    a = random_block(20, 12, 5, 3, torch.Generator().manual_seed(7))
    b = random_block(20, 12, 5, 3, torch.Generator().manual_seed(7))
    assert indices(*a) == indices(*b)
    rows, cols = a
    assert rows.tolist() == sorted(set(rows.tolist())) and len(rows) == 5 and len(cols) == 3


def test_magnitude_block():
    weight = torch.tensor([[0.1, -3.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.5, -0.2]])
    assert indices(*magnitude_block(weight, 2, 1)) == ([0, 1], [1])


W = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
G = torch.tensor([[0.5, 1.0], [2.0, -4.0]])  # W*G = [[0.5, 2], [-2, -2]]


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("param_mix", [[0.375, 0.0], [4.0, 4.0]]),  # |wg - wg^2/2|
        ("param_first", [[0.5, 2.0], [2.0, 2.0]]),
        ("param_second", [[0.25, 4.0], [4.0, 4.0]]),
    ],
)
def test_sensitivity(kind, expected):
    assert sensitivity(W, G, kind).tolist() == expected


def test_scorer_emas_without_bias_correction():
    scorer = Scorer((2, 2), torch.device("cpu"), "param_first", beta1=0.85, beta2=0.85)
    i1 = sensitivity(W, G, "param_first")
    scorer.grad_acc.copy_(G)
    scorer.update(W)
    assert torch.equal(scorer.grad_acc, torch.zeros(2, 2))  # cleared for the next step
    ibar1 = 0.15 * i1
    ubar1 = 0.15 * (i1 - ibar1).abs()
    torch.testing.assert_close(scorer.ibar, ibar1)
    torch.testing.assert_close(scorer.ubar, ubar1)

    scorer.grad_acc.copy_(2 * G)  # second step: I doubles
    scorer.update(W)
    i2 = 2 * i1
    ibar2 = 0.85 * ibar1 + 0.15 * i2
    ubar2 = 0.85 * ubar1 + 0.15 * (i2 - ibar2).abs()
    torch.testing.assert_close(scorer.ibar, ibar2)
    torch.testing.assert_close(scorer.ubar, ubar2)
    score = scorer.score()
    assert score.dtype == torch.float32
    torch.testing.assert_close(score, ibar2 * ubar2)


def test_scorer_is_fp32_for_bf16_weights():
    scorer = Scorer((2, 2), torch.device("cpu"), "param_mix", 0.85, 0.85)
    scorer.grad_acc.copy_(G)
    scorer.update(W.to(torch.bfloat16))
    assert scorer.ibar.dtype == torch.float32
    torch.testing.assert_close(scorer.ibar, 0.15 * sensitivity(W, G))
