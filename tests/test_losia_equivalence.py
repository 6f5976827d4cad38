"""LoSiA-Pro trains exactly like the dense reference, and updates stay inside the recorded blocks."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from losia_cli.methods import Distributed

from test_losia_support import one_thread  # noqa: F401  (autouse fixture)
from test_losia_support import (
    FP64_ATOL, batch, build, make_optimizer, tiny_gemma, tiny_llama, tiny_qwen2, train, train_step,
)

STEPS = 50


def run(name: str, grad_accum: int = 1, model_fn=tiny_llama, **cfg):
    """A 50-step run in fp64, where Pro and the dense form can be held to FP64_ATOL."""
    records = []
    model, method = build(model_fn, total_steps=STEPS, records=records, name=name, dtype=torch.float64, **cfg)
    train(model, method, make_optimizer(method), range(STEPS), grad_accum)
    return model, method, records


def assert_same_run(a, b, atol=FP64_ATOL):
    (model_a, _, records_a), (model_b, _, records_b) = a, b
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], atol=atol, rtol=0, msg=key)
    assert [(r["step"], r["module"], r["rows"], r["cols"]) for r in records_a] == [
        (r["step"], r["module"], r["rows"], r["cols"]) for r in records_b
    ]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_pro_matches_dense_reference(grad_accum):
    reference = run("losia", grad_accum)
    pro = run("losia_pro", grad_accum)
    relocalizations = [r for r in pro[2] if r["source"] == "score"]
    assert len(relocalizations) >= 14 * 8  # every matrix of both layers moved about 8 times
    assert_same_run(reference, pro)


@pytest.mark.parametrize(
    "model_fn, cfg",
    [
        (tiny_llama, {"schedule": "sync"}),
        # Tied lm_head as slot 0: its block also takes the embedding path's gradient.
        (tiny_gemma, {"lm_head_rows": 0.25, "dense_extras": "norms"}),
        (tiny_qwen2, {"dense_extras": "all", "importance": "param_second", "compat_keep_step_counter": True}),
    ],
    ids=["llama-sync", "gemma-lm_head", "qwen2-extras"],
)
def test_pro_matches_dense_reference_variants(model_fn, cfg):
    assert_same_run(run("losia", model_fn=model_fn, **cfg), run("losia_pro", model_fn=model_fn, **cfg))


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_pro_matches_dense_reference():
    cfg = {"target_modules": ["c_attn", "c_proj", "c_fc"], "slot_pattern": r"h\.(\d+)\."}
    pro = run("losia_pro", model_fn=tiny_gpt2, **cfg)
    assert len(pro[1].targets) == 8
    assert_same_run(run("losia", model_fn=tiny_gpt2, **cfg), pro)


def block_mask(shape, rows, cols) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[torch.as_tensor(rows)[:, None], torch.as_tensor(cols)] = True
    return mask


@pytest.mark.parametrize("name", ["losia_pro", "losia"])
def test_delta_form_trains_like_write_through(name):
    """The form FSDP runs (W written only when a block moves and at the end) trains the same model,
    with the same blocks, as writing `sub` through into W after every step."""
    steps = 20
    runs = []
    for sharded in (False, True):
        records = []
        model, method = build(
            total_steps=steps, records=records, ctx_kw={"sharded_weights": sharded}, name=name, dtype=torch.float64
        )
        assert all(t.module.delta == sharded for t in method.targets)
        train(model, method, make_optimizer(method), range(steps))
        if sharded:  # until the end W still holds each block as it was when it was chosen
            assert any(not torch.equal(t.module._effective(t.module.weight_oi), t.module.weight_oi)
                       for t in method.targets)
        method.finalize(model)
        runs.append((model, method, records))
    assert sum(r["source"] == "score" for r in runs[1][2]) >= 14 * 2
    assert_same_run(*runs)


def test_updates_stay_inside_the_block():
    records = []
    model, method = build(total_steps=30, records=records, name="losia_pro", dense_extras="none")
    optimizer = make_optimizer(method)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(30):
        before = {}
        for t in method.targets:
            before[t.name] = (t.module.weight.clone(), t.module.rows.clone(), t.module.cols.clone())
        train_step(model, method, optimizer, step)
        for t in method.targets:
            weight, rows, cols = before[t.name]
            changed = t.module.weight != weight
            assert not (changed & ~block_mask(weight.shape, rows, cols)).any(), (step, t.name)

    # Over the run: every changed entry lies in the union of the blocks recorded for its matrix.
    union: dict[str, torch.Tensor] = {}
    block_size = {r["module"]: len(r["rows"]) * len(r["cols"]) for r in records}
    for r in records:
        mask = block_mask(r["shape"], r["rows"], r["cols"])
        union[r["module"]] = union.get(r["module"], torch.zeros_like(mask)) | mask
    end = model.state_dict()
    for key, value in start.items():
        changed = end[key] != value
        if key in union:
            assert not (changed & ~union[key]).any(), key
            assert changed.sum() > block_size[key], key  # more than one block was trained
        elif not key.endswith((".sub", ".rows", ".cols")):
            assert not changed.any(), f"{key} is not trained but changed"


def test_step_zero_of_a_warmup_changes_nothing_and_later_steps_do():
    model, method = build(name="losia_pro")
    optimizer = make_optimizer(method)
    weight = method.targets[0].module.weight.clone()
    train_step(model, method, optimizer, 0)
    assert torch.equal(method.targets[0].module.weight, weight)
    train_step(model, method, optimizer, 1)
    assert not torch.equal(method.targets[0].module.weight, weight)


def test_data_parallel_scorer_uses_the_mean_gradient():
    """Two ranks with identical data: the all-reduced sum / world size equals the single-process run."""
    calls = []

    class TwoIdenticalRanks(Distributed):
        world_size = 2

        def all_reduce_sum(self, tensor):
            calls.append(tensor.shape)
            tensor.mul_(2)

    single = build(name="losia_pro")
    simulated = build(name="losia_pro", ctx_kw={"dist": TwoIdenticalRanks()})
    for model, method in (single, simulated):
        train(model, method, make_optimizer(method), range(7))
    assert calls  # the scorer's gradient went through the hook
    for key, value in single[0].state_dict().items():  # x * 2 / 2 is exact: the same floats
        assert torch.equal(simulated[0].state_dict()[key], value), key


def test_eval_forward_in_no_grad_needs_no_backward_state():
    model, method = build(name="losia_pro")
    with torch.no_grad():
        logits = model(input_ids=batch(0, 0)).logits
    assert logits.shape[-1] == 64


def test_fp64_model_keeps_fp64_blocks_and_scores():
    """fp32_sub means at least fp32: an fp64 model's block and scores are not rounded to fp32 (the fp64
    comparisons above rely on it)."""
    model, method = build(name="losia_pro", dtype=torch.float64)
    train(model, method, make_optimizer(method), range(4))
    assert all(t.module.sub.dtype == torch.float64 for t in method.targets)
    scorers = [t.module.scorer for t in method.targets if t.module.scorer is not None]
    assert scorers and all(s.grad_acc.dtype == s.ibar.dtype == torch.float64 for s in scorers)


@pytest.mark.parametrize("fp32_sub", [True, False])
def test_bf16_model(fp32_sub):
    """bf16 weights: `sub` is an fp32 master copy (or bf16), W holds its rounded value after each step,
    and Pro stays close to the reference."""
    runs = []
    for name in ("losia", "losia_pro"):
        model, method = build(name=name, dtype=torch.bfloat16, fp32_sub=fp32_sub)
        train(model, method, make_optimizer(method), range(12))
        runs.append(model)
        for t in method.targets:
            assert t.module.sub.dtype == (torch.float32 if fp32_sub else torch.bfloat16)
            block = t.module.weight[t.module.rows][:, t.module.cols]
            assert torch.equal(block, t.module.sub.to(torch.bfloat16))
    reference, pro = (model.state_dict() for model in runs)
    for key in reference:
        torch.testing.assert_close(pro[key].float(), reference[key].float(), atol=2e-2, rtol=0, msg=key)


def test_autocast_pro_follows_the_reference():
    """fp32 weights under bf16 autocast, within one block (no re-localization, so bf16-rounded scores
    cannot pick different blocks): Pro stays close to the dense reference."""
    runs = [build(name=name, period=100) for name in ("losia", "losia_pro")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for model, method in runs:
            train(model, method, make_optimizer(method), range(8))
    reference, pro = (model.state_dict() for model, _ in runs)
    assert any(not torch.equal(v, tiny_llama().state_dict().get(k, v)) for k, v in pro.items())
    for key in reference:
        torch.testing.assert_close(pro[key], reference[key], atol=1e-2, rtol=0, msg=key)
