"""Time slots, re-localization steps and the rewarmed LR (docs/method.md 4.1, 5.4, 12)."""

from __future__ import annotations

import math

import pytest

from losia_cli.methods.base import Records, WarmupCosine
from losia_cli.methods.losia.schedule import Rewarm, SlotSchedule, layer_index
from test_losia_support import one_thread  # noqa: F401  (autouse fixture)
from test_losia_support import ListRecords, build, make_optimizer, tiny_llama

T, LAYERS, STEPS = 4, 3, 40


def drive(steps: int = STEPS, total_steps: int = 400, **cfg):
    """Run the method's step hooks without training: (method, records, [scoring layers per update])."""
    records = []
    _, method = build(lambda: tiny_llama(LAYERS), total_steps=total_steps, records=records, period=T, **cfg)
    optimizer = make_optimizer(method)
    scoring = []
    for step in range(steps):
        scoring.append(sorted({t.layer for t in method.targets if t.module.mode == "scoring"}))
        method.on_step(step, optimizer)
    return method, records, scoring


def relocalization_steps(records, layer: int) -> list[int]:
    return sorted({r["step"] for r in records if r["layer"] == layer and r["source"] == "score"})


def test_async_slots():
    method, records, scoring = drive()
    # Slot owner of update s is floor(s/T) mod L; it re-localizes after the last update of its slot, so
    # its new block trains from update (k*L + g + 1)*T on.
    assert scoring == [[(s // T) % LAYERS] for s in range(STEPS)]
    for g in range(LAYERS):
        expected = [(k * LAYERS + g + 1) * T for k in range(STEPS) if (k * LAYERS + g + 1) * T <= STEPS]
        assert relocalization_steps(records, g) == expected
    assert all(t.module.mode == "compact" or t.layer == (STEPS // T) % LAYERS for t in method.targets)
    # One record per matrix per (re)localization, all 7 matrices of a layer together.
    assert len([r for r in records if r["step"] == T]) == 7


def test_sync_slots():
    _, records, scoring = drive(schedule="sync")
    cycle = LAYERS * T
    assert scoring == [list(range(LAYERS)) if (s // T) % LAYERS == 0 else [] for s in range(STEPS)]
    for g in range(LAYERS):
        expected = [k * cycle + T for k in range(STEPS) if k * cycle + T <= STEPS]
        assert relocalization_steps(records, g) == expected


def test_lm_head_is_slot_zero():
    method, records, scoring = drive(lm_head_rows=0.25)
    slots = {t.name: t.slot for t in method.targets}
    assert slots["lm_head"] == 0 and slots["model.layers.0.self_attn.q_proj"] == 1
    assert [len(group["params"]) for group in method.param_groups(1.0, 0.0)] == [1, 7, 7, 7]
    assert scoring[:T] == [[-1]] * T  # the head (layer -1 in records) scores first
    assert relocalization_steps(records, -1) == [T, 5 * T, 9 * T]
    head = method.targets[-1].module
    assert head.sub.shape == (16, 32) and head.cols.tolist() == list(range(32))


@pytest.mark.parametrize("schedule", ["async", "sync"])
def test_a_slot_that_cannot_finish_does_not_score(schedule):
    """With 14 updates and T = 4 the slot of updates 12-15 (layer 0; all layers when sync) would
    re-localize after the run: no scoring buffers, no scoring GEMM for it."""
    _, records, scoring = drive(steps=14, total_steps=14, schedule=schedule)
    assert scoring[12:] == [[], []]
    assert scoring[:12] == drive(steps=12, schedule=schedule)[2]


def test_a_single_slot_scores_again_after_it_moves():
    _, method = build(lambda: tiny_llama(1), period=2)
    optimizer = make_optimizer(method)
    for step in range(6):  # moves after updates 1, 3 and 5: each needs the scores of its period
        method.on_step(step, optimizer)
    assert all(t.module.mode == "scoring" for t in method.targets)


def test_records_are_built_only_for_a_listener():
    assert not Records().listening and ListRecords([]).listening


def test_every_initial_block_is_logged():
    _, records, _ = drive(steps=1)
    assert len(records) == 7 * LAYERS
    record = records[0]
    assert record["step"] == 0 and record["source"] == "random"
    assert record["module"] == "model.layers.0.self_attn.q_proj.weight" and record["shape"] == [32, 32]
    assert len(record["rows"]) == 8 and len(record["cols"]) == 8


def test_lr_is_zero_after_a_relocalization_and_ramps_onto_the_cosine():
    method, _, _ = drive()
    cosine = method.ctx.schedule
    assert method.restarts == [10 * T, 8 * T, 9 * T]  # t_r: the update each layer's last block began
    t_r = method.restarts[1]
    for k in range(T + 2):
        factors = method.lr_factors(t_r + k, 3)
        assert factors[1] == pytest.approx(cosine.factor(t_r + k) * min(1.0, k / T))
    assert method.lr_factors(t_r, 3)[1] == 0.0
    assert method.lr_factors(t_r + T, 3)[1] == cosine.factor(t_r + T)  # ends on the curve, no jump


def test_no_rewarm_before_the_first_relocalization():
    model, method = build(lambda: tiny_llama(LAYERS), total_steps=STEPS, period=T)
    assert method.lr_factors(7, 3) == [method.ctx.schedule.factor(7)] * 3


def test_lr_factors_count_the_dense_extras_group():
    model, method = build(dense_extras="norms")
    names = [group["name"] for group in method.param_groups(1.0, 0.0)]
    assert names == ["losia.layer0", "losia.layer1", "dense_extras"]
    assert len(method.lr_factors(0, 3)) == 3
    with pytest.raises(ValueError, match="LoSiA made 3"):
        method.lr_factors(0, 2)


def test_rewarm_formula():
    cosine = WarmupCosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    rewarm = Rewarm(cosine, length=5)
    assert rewarm.factor(3, None) == cosine.factor(3) == 0.3
    assert rewarm.factor(50, 50) == 0.0
    assert rewarm.factor(52, 50) == pytest.approx(0.4 * cosine.factor(52))
    assert rewarm.factor(55, 50) == cosine.factor(55)
    assert Rewarm(cosine, length=0).factor(50, 50) == cosine.factor(50)


def test_reference_schedule_reproduces_the_jump():
    total, warmup, period = 110, 10, 5
    cosine = WarmupCosine(total_steps=total, warmup_steps=warmup, min_ratio=0.1)
    reference = Rewarm(cosine, length=period, compat_reference=True)

    def c(x):
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * x))

    t_r = 50
    assert reference.factor(3, t_r) == 0.3  # global warmup overrides
    assert reference.factor(t_r, t_r) == 0.0
    # The ramp aims at c(t_r/(N-W)) ...
    assert reference.factor(t_r + 4, t_r) == pytest.approx(4 / 5 * c(t_r / 100))
    # ... which lies below the curve it continues on, c((t-W)/(N-W)): the LR jumps when the ramp ends.
    end = reference.factor(t_r + 5, t_r)
    assert end == pytest.approx(c((t_r + 5 - warmup) / 100))
    assert c(t_r / 100) < end
    assert end > reference.factor(t_r + 4, t_r) * 5 / 4
    # The reference's t_r starts at 0: with a short warmup the start is ramped too.
    assert Rewarm(WarmupCosine(110, 2, 0.1), period, True).factor(3, None) == pytest.approx(3 / 5 * c(0))


def test_method_uses_the_reference_schedule_flag():
    method, _, _ = drive(compat_reference_schedule=True)
    t_r = method.restarts[1]
    ramp_end, after = method.lr_factors(t_r + T - 1, 3)[1], method.lr_factors(t_r + T, 3)[1]
    assert method.lr_factors(t_r, 3)[1] == 0.0
    assert after > ramp_end * T / (T - 1)  # the jump


def test_slot_schedule_and_layer_index():
    schedule = SlotSchedule(num_slots=2, period=3)
    assert [schedule.scoring_slots(s) for s in range(7)] == [[0], [0], [0], [1], [1], [1], [0]]
    assert [s for s in range(12) if schedule.relocalizing_slots(s)] == [2, 5, 8, 11]
    assert layer_index("model.layers.12.mlp.up_proj", r"layers?\.(\d+)\.") == 12
    assert layer_index("lm_head", r"layers?\.(\d+)\.") is None
