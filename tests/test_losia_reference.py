"""`losia` and `losia_pro` against an independent plain-PyTorch LoSiA (reference_losia.py).

Unlike test_losia_equivalence (Pro against non-Pro, which share the scorer, selection, schedule and
optimizer handling), these catch a wrong moment reset, rewarm, schedule or selection.
"""

from __future__ import annotations

import pytest
import torch

from reference_losia import train_reference
from test_losia_support import one_thread  # noqa: F401  (autouse fixture)
from test_losia_support import FP64_ATOL, batch, build, make_optimizer, tiny_gemma, tiny_llama, train

STEPS = 24  # T = 3: eight slot ends, every matrix of a 2-layer model moves at least four times


def ours(name: str, model_fn, grad_accum: int = 1, steps: int = STEPS, dtype=torch.float32, **cfg):
    records = []
    model, method = build(model_fn, total_steps=50, records=records, name=name, dtype=dtype, **cfg)
    train(model, method, make_optimizer(method), range(steps), grad_accum)
    method.finalize(model)
    moves = sorted((r["step"], r["module"], r.get("expert"), r["rows"], r["cols"]) for r in records)
    return method.export(model).state_dict(), moves


def theirs(model_fn, steps: int = STEPS, dtype=torch.float32, **kw):
    model = model_fn().to(dtype)
    moves = train_reference(model, steps=steps, **kw)
    return model.state_dict(), sorted(moves)


def assert_same(ours_run, ref_run, atol: float = 0.0):
    (state, moves), (ref_state, ref_moves) = ours_run, ref_run
    assert moves == ref_moves
    assert len([m for m in moves if m[0] > 0]) >= 2 * 14  # every matrix moved at least twice
    assert state.keys() == ref_state.keys()
    for key in state:
        torch.testing.assert_close(state[key], ref_state[key], atol=atol, rtol=0, msg=key)


CASES = {
    "async": {},
    "sync": {"schedule": "sync"},
    "grad-accum": {"grad_accum": 2},
    "dense-extras": {"dense_extras": "all"},
    "norms+lm_head": {"dense_extras": "norms", "lm_head_rows": 0.25},
}


@pytest.mark.parametrize("name", ["losia", "losia_pro"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_independent_reference(name, case):
    """Same blocks at every re-localization, same weights after 24 steps: bit for bit for `losia` in fp32
    (autograd slices the same dense GEMM); `losia_pro` computes G[:, R]^T X[:, C] as its own smaller
    GEMM, whose sums BLAS may block differently, so it is compared in fp64 (FP64_ATOL)."""
    cfg = dict(CASES[case])
    grad_accum = cfg.pop("grad_accum", 1)
    dtype, atol = (torch.float32, 0.0) if name == "losia" else (torch.float64, FP64_ATOL)
    ours_run = ours(name, tiny_llama, grad_accum, dtype=dtype, **cfg)
    assert_same(ours_run, theirs(tiny_llama, grad_accum=grad_accum, dtype=dtype, **cfg), atol)


@pytest.mark.parametrize("name", ["losia", "losia_pro"])
def test_tied_lm_head_matches_reference(name):
    """Gemma ties lm_head to the embedding: the block must also get the embedding path's gradient.
    The two paths' sums land in W.grad in a different order than in ours, hence fp64 and FP64_ATOL."""
    cfg = {"lm_head_rows": 0.25, "dense_extras": "norms", "dtype": torch.float64}
    assert_same(ours(name, tiny_gemma, **cfg), theirs(tiny_gemma, **cfg), atol=FP64_ATOL)


def test_compat_mode_matches_reference_adamw():
    """compat_* flags reproduce the reference's HF-style AdamW (eps before the bias correction, step
    counter kept across resets) and its rewarm formula. Our eps is rescaled per step to the same
    maths, so floats differ in the last bits (hence fp64 and FP64_ATOL; without compat_eps they differ by
    0.05); weight decay is off as in the reference scripts."""
    cfg = {"compat_keep_step_counter": True, "compat_eps": True, "compat_reference_schedule": True}
    model, method = build(tiny_llama, total_steps=50, name="losia", dtype=torch.float64, **cfg)
    optimizer = method.make_optimizer(method.param_groups(1e-2, 0.0), 1e-2, (0.9, 0.999), 1e-8)
    for group in optimizer.param_groups:
        group["base_lr"] = 1e-2
    train(model, method, optimizer, range(STEPS))
    reference = tiny_llama().to(torch.float64)
    train_reference(reference, steps=STEPS, adamw="hf", weight_decay=0.0)
    state, ref_state = method.export(model).state_dict(), reference.state_dict()
    for key in state:
        torch.testing.assert_close(state[key], ref_state[key], atol=FP64_ATOL, rtol=0, msg=key)


@pytest.mark.parametrize("name", ["losia", "losia_pro"])
def test_tied_head_gradient_has_both_paths(name):
    """The block's gradient and the scorer's full gradient equal the tied weight's true gradient (the
    head path plus the embedding lookup, whose padding row gets none; issue 18 saw 0.098 without it).
    In fp64: the two sides add the same terms in another order."""
    model, method = build(tiny_gemma, name=name, lm_head_rows=0.25, dtype=torch.float64)
    head = next(t.module for t in method.targets if t.name == "lm_head")
    ids = batch(0, 0)
    assert (ids == model.config.pad_token_id).any()
    model(input_ids=ids, labels=ids).loss.backward()
    full = tiny_gemma().to(torch.float64)
    full.requires_grad_(False)
    full.lm_head.weight.requires_grad_(True)
    full(input_ids=ids, labels=ids).loss.backward()
    tied_grad = full.lm_head.weight.grad
    torch.testing.assert_close(head.sub.grad, tied_grad[head.rows], atol=FP64_ATOL, rtol=0)
    torch.testing.assert_close(head.scorer.grad_acc, tied_grad, atol=FP64_ATOL, rtol=0)
