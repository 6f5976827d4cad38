"""CUDA checks (marked `gpu`, skipped without CUDA; benchmarks/gpu/run.sh runs them): LoSiA-Pro against
the dense reference in bf16 and under autocast, the delta form, scoring, and a tiny model trained
with every method in bf16 through the engine, checkpointed, resumed and merged."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from test_losia_support import build, make_optimizer, tiny_llama, train
from test_scorer_fused import assert_compiled_matches_eager

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_bf16():
    return tiny_llama().to("cuda", torch.bfloat16)


def _close_runs(runs, atol):
    reference, pro = (model.state_dict() for model in runs)
    for key in reference:
        torch.testing.assert_close(pro[key].float(), reference[key].float(), atol=atol, rtol=0, msg=key)


def test_pro_follows_the_dense_reference_in_bf16():
    runs = []
    for name in ("losia", "losia_pro"):
        model, method = build(_cuda_bf16, name=name)
        train(model, method, make_optimizer(method), range(12))
        for t in method.targets:  # fp32 master block, written through rounded into W
            assert t.module.sub.dtype == torch.float32 and t.module.sub.is_cuda
            assert torch.equal(t.module.weight[t.module.rows][:, t.module.cols], t.module.sub.to(torch.bfloat16))
        runs.append(model)
    _close_runs(runs, atol=2e-2)


def test_fp32_weights_under_bf16_autocast():
    runs = [build(lambda: tiny_llama().cuda(), name=name, period=100) for name in ("losia", "losia_pro")]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for model, method in runs:
            train(model, method, make_optimizer(method), range(8))
    _close_runs([model for model, _ in runs], atol=1e-2)


@pytest.mark.parametrize("name", ["losia_pro", "losia"])
def test_delta_form_trains_like_write_through(name):
    """Within one block (bf16 rounding differs between the forms, so scores could pick other blocks)."""
    runs = []
    for sharded in (False, True):
        model, method = build(_cuda_bf16, total_steps=12, ctx_kw={"sharded_weights": sharded}, name=name,
                              period=100)
        train(model, method, make_optimizer(method), range(12))
        method.finalize(model)
        runs.append(model)
    _close_runs(runs, atol=2e-2)


def test_scoring_accumulates_the_dense_gradient():
    from losia_cli.methods.losia.layer import SubnetLinear

    linear = tiny_llama().model.layers[0].mlp.up_proj.to("cuda", torch.bfloat16)
    dense = copy.deepcopy(linear).requires_grad_(True)
    rows, cols = torch.arange(0, 64, 4), torch.arange(0, 32, 4)
    wrapped = SubnetLinear(copy.deepcopy(linear), rows, cols, pro=True)
    wrapped.start_scoring("param_mix", 0.85, 0.85)
    x = torch.randn(3, 5, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(3, 5, 64, device="cuda", dtype=torch.bfloat16)
    dense(x).backward(grad_out)
    wrapped(x.detach().requires_grad_(True)).backward(grad_out)
    assert wrapped.scorer.grad_acc.dtype == torch.float32
    torch.testing.assert_close(wrapped.scorer.grad_acc, dense.weight.grad.float(), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(wrapped.sub.grad, dense.weight.grad.float()[rows][:, cols], atol=5e-2, rtol=2e-2)


def test_compiled_scorer_update_matches_eager():
    assert_compiled_matches_eager(torch.device("cuda"), "param_mix", torch.bfloat16)


def test_device_timer_times_cuda_work_without_waiting_for_it():
    from losia_cli.methods.base import DeviceTimer

    timer = DeviceTimer(torch.device("cuda"))
    for _ in range(3):
        with timer.section():
            torch.cuda._sleep(50_000_000)  # tens of ms of GPU time; the host returns at once
    assert timer._pending  # the host did not wait for the last section
    assert timer.seconds > 0.01 and not timer._pending


METHODS = {
    "full": ("method=full",), "lora": ("method=lora",), "lora_bf16": ("method=lora", "method.adapter_dtype=base"),
    "dora": ("method=dora",), "pissa": ("method=pissa",), "galore": ("method=galore", "method.rank=4"),
    "losia": ("method=losia", "method.period=2"), "losia_pro": ("method=losia_pro", "method.period=2"),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_resumes_and_merges_in_bf16(name, tiny_config, tmp_path):
    from losia_cli.workflow import train as train_run
    from losia_cli.merge import merge

    if name == "galore" and importlib.util.find_spec("galore_torch") is None:
        pytest.skip("galore-torch is not installed")
    common = (*METHODS[name], "model.dtype=bf16", "train.device=cuda", "train.max_steps=4", "train.save_every=2")
    straight = train_run(tiny_config("straight", *common))
    resumed = train_run(tiny_config("resumed", *common, f"run.resume={straight / 'checkpoints' / 'step-2'}"))
    a, b = (load_file(str(next((d / "final").glob("*.safetensors")))) for d in (straight, resumed))
    assert a.keys() == b.keys()
    for key in a:  # CUDA kernels need not be bit-exact run to run; bf16 rounding bounds the rest
        torch.testing.assert_close(b[key].float(), a[key].float(), atol=2e-2, rtol=0, msg=key)
    manifest = merge(resumed, tmp_path / "merged")
    assert manifest["verified"]
