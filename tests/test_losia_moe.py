"""LoSiA and LoSiA-Pro on mixture-of-experts models (Mixtral, Qwen3-MoE: 3-D expert parameters in
transformers 5): a block per expert, recorded per expert in subnets.jsonl; an expert the router sends no
token in a step gets no update and no score; checked against the independent reference."""

from __future__ import annotations

import functools

import pytest
import torch

from reference_losia import train_reference
from test_losia_support import one_thread  # noqa: F401  (autouse fixture)
from test_losia_support import FP64_ATOL, build, make_optimizer, tiny_moe, train, train_step

STEPS = 12  # T = 3: four slot ends, each layer's experts re-localize twice


def routed_experts(model) -> list[set[int]]:
    """Per decoder layer, the experts its router sent tokens to in the last forward (a hook each)."""
    seen = [set() for _ in model.model.layers]
    for i, layer in enumerate(model.model.layers):
        layer.mlp.experts.register_forward_hook(
            lambda module, args, out, i=i: seen[i].update(args[1].flatten().tolist()))
    return seen


def moves_of(records: list[dict]) -> list[tuple]:
    return sorted((r["step"], r["module"], r.get("expert"), r["rows"], r["cols"]) for r in records)


@pytest.mark.parametrize(("family", "name", "cfg"), [
    ("mixtral", "losia", {}), ("mixtral", "losia_pro", {}), ("qwen3_moe", "losia_pro", {}),
    ("mixtral", "losia_pro", {"dense_extras": "all"}),  # the 3-D expert parameters stay out of the dense group
], ids=["mixtral-losia", "mixtral-losia_pro", "qwen3_moe-losia_pro", "mixtral-losia_pro-dense_extras"])
def test_expert_blocks_match_the_independent_reference(family, name, cfg):
    """Same blocks at every re-localization and the same weights after 12 steps as reference_losia,
    whose experts are the model's own (transformers' eager experts loop, gradient into the 3-D
    parameter). Its sums run in another order than ours, hence fp64 and FP64_ATOL."""
    model_fn = functools.partial(tiny_moe, family)
    records = []
    model, method = build(model_fn, total_steps=50, records=records, name=name, dtype=torch.float64, **cfg)
    assert all(p.dim() < 3 for p in method.extras)  # no expert stack in the dense group (nor trainable)
    train(model, method, make_optimizer(method), range(STEPS))
    state = method.export(model).state_dict()
    reference = model_fn().to(torch.float64)
    ref_moves = sorted(train_reference(reference, steps=STEPS, **cfg))
    assert moves_of(records) == ref_moves
    assert len([m for m in ref_moves if m[0] > 0 and m[2] is not None]) >= 2 * 2 * 8  # experts moved
    ref_state = reference.state_dict()
    assert state.keys() == ref_state.keys()
    for key in state:
        torch.testing.assert_close(state[key], ref_state[key], atol=FP64_ATOL, rtol=0, msg=key)


@pytest.mark.parametrize("name", ["losia", "losia_pro"])
def test_an_idle_expert_gets_no_update_and_no_score(name):
    """Step 0 and 1 are layer 0's scoring slot. An expert routed tokens in step 0 but none in step 1
    keeps its block values and its score from step 0 through step 1 (a zero gradient would still move
    it through Adam's momentum and weight decay, and decay its score)."""
    model, method = build(tiny_moe, name=name, dtype=torch.float64)
    optimizer = make_optimizer(method)
    seen = routed_experts(model)
    experts = {t.expert: t.module for t in method.targets if t.key == "model.layers.0.mlp.experts.down_proj"}
    train_step(model, method, optimizer, 0)
    hit_before = set(seen[0])
    before = {e: (m.sub.clone(), m.scorer.ibar.clone()) for e, m in experts.items()}
    seen[0].clear()
    train_step(model, method, optimizer, 1)
    idle = hit_before - seen[0]
    assert idle and seen[0], (hit_before, seen[0])  # the data must show both cases
    for e, (sub, ibar) in before.items():
        scored_and_moved = not torch.equal(experts[e].scorer.ibar, ibar), not torch.equal(experts[e].sub, sub)
        assert scored_and_moved == ((False, False) if e in idle else (True, True)), e


def test_merged_weights_differ_from_the_base_only_inside_the_recorded_blocks():
    """The exported model is the plain transformers model (same keys, its own experts class); every
    changed entry of a weight lies in a block recorded for that weight (and expert)."""
    records = []
    model, method = build(tiny_moe, total_steps=50, records=records, name="losia_pro", dtype=torch.float64)
    base = {key: value.clone() for key, value in tiny_moe().to(torch.float64).state_dict().items()}
    train(model, method, make_optimizer(method), range(7))  # layer 0 re-localized at 3, layer 1 at 6
    exported = method.export(model)
    state = exported.state_dict()
    assert state.keys() == base.keys()
    assert type(exported.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    allowed = {key: torch.zeros_like(value, dtype=torch.bool) for key, value in base.items()}
    for r in records:
        matrix = allowed[r["module"]] if "expert" not in r else allowed[r["module"]][r["expert"]]
        matrix[torch.tensor(r["rows"])[:, None], torch.tensor(r["cols"])] = True
    changed_experts = 0
    for key, value in state.items():
        changed = value != base[key]
        assert not (changed & ~allowed[key]).any(), key
        changed_experts += int(key.endswith(("gate_up_proj", "down_proj")) and changed.any())
    assert changed_experts == 4  # both expert parameters of both layers trained
    assert {r["expert"] for r in records if "expert" in r} == set(range(8))


def test_an_expert_never_scored_in_its_slot_keeps_its_block():
    """An expert the router sent no token during its whole scoring slot has no score (zero): its block
    stays and no move is recorded (selecting from zeros would pick the first rows and columns)."""
    records = []
    model, method = build(tiny_moe, records=records, name="losia_pro")
    target = next(t for t in method.targets if t.expert == 3)
    rows, cols = target.module.rows.clone(), target.module.cols.clone()
    assert target.module.scorer is not None and not target.module.scorer.score().any()
    before = len(records)
    method._relocalize(target, step=2)
    assert torch.equal(target.module.rows, rows) and torch.equal(target.module.cols, cols)
    assert len(records) == before and target.module.scorer is None
