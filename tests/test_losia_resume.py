"""Checkpoint and resume: model + method + optimizer state dicts continue a run bit-exactly."""

from __future__ import annotations

import io

import pytest
import torch

from test_losia_support import one_thread  # noqa: F401  (autouse fixture)
from test_losia_support import build, make_optimizer, tiny_llama, train

TOTAL, ACCUM = 14, 2  # T=3 on 2 layers: slots [0-2] [3-5] [6-8] ...


def fresh(name: str, records: list, model_seed: int):
    # A different model init proves that loading, not the seed, restores the weights.
    model, method = build(lambda: tiny_llama(seed=model_seed), total_steps=TOTAL, records=records, name=name)
    return model, method, make_optimizer(method)


def checkpoint(model, method, optimizer) -> bytes:
    buffer = io.BytesIO()
    state = {"model": model.state_dict(), "method": method.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["losia_pro", "losia"])
@pytest.mark.parametrize("stop", [3, 4, 6], ids=["slot-boundary", "mid-scoring-slot", "after-relocalization"])
def test_resume_is_bit_exact(name, stop):
    straight_records = []
    model, method, optimizer = fresh(name, straight_records, model_seed=0)
    train(model, method, optimizer, range(TOTAL), ACCUM)

    first_records = []
    model_a, method_a, optimizer_a = fresh(name, first_records, model_seed=0)
    train(model_a, method_a, optimizer_a, range(stop), ACCUM)
    saved = checkpoint(model_a, method_a, optimizer_a)
    del model_a, method_a, optimizer_a

    resumed_records = []
    model_b, method_b, optimizer_b = fresh(name, resumed_records, model_seed=123)
    state = torch.load(io.BytesIO(saved), weights_only=True)
    model_b.load_state_dict(state["model"])
    method_b.load_state_dict(state["method"])
    optimizer_b.load_state_dict(state["optimizer"])
    if stop == 4:
        assert state["method"]["scorers"], "the checkpoint should fall inside a scoring slot"
    train(model_b, method_b, optimizer_b, range(stop, TOTAL), ACCUM)

    expected, got = model.state_dict(), model_b.state_dict()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert method_b.restarts == method.restarts
    later = [r for r in straight_records if r["step"] > stop]
    assert [r for r in resumed_records if r["step"] > stop] == later and later


def test_on_step_checks_the_step_it_is_given():
    model, method = build()
    with pytest.raises(RuntimeError, match="expected step=0"):
        method.on_step(1, make_optimizer(method))
