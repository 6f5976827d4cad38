"""The one step driver (engine/step.py), the method registry and the one percentile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_losia_support import one_thread  # noqa: F401  (autouse fixture)
from test_losia_support import FP64_ATOL, VOCAB, tiny_llama

from losia_cli.engine.records import percentile
from losia_cli.engine.step import StepDriver, build_optimizer
from losia_cli.methods import TrainContext, WarmupCosine, build_method, exports_adapter, method_class, method_names
from losia_cli.methods.full import FullConfig, FullMethod
from losia_cli.methods.registry import register

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "method"


def _full_driver(dtype: torch.dtype = torch.float32):
    method = FullMethod(FullConfig())
    model = method.prepare(tiny_llama().to(dtype), TrainContext(schedule=WarmupCosine(4), total_steps=4))
    return model, StepDriver(model, method, build_optimizer(method, 1e-2, 0.0))


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_micro_batches_give_the_gradient_of_one_batch_over_all_target_tokens():
    """Micro-batches with different numbers of target tokens: the gradient is the mean over the
    step's target tokens, as if the micro-batches were one batch (not a mean of per-batch means)."""
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :9] = -100  # the first micro-batch has 2 targets, the second 11
    micro = [{"input_ids": ids[i : i + 1], "labels": labels[i : i + 1]} for i in range(2)]
    targets = int((labels[:, 1:] != -100).sum())

    model, driver = _full_driver(torch.float64)  # the two forms sum the same terms in another order
    loss_sum = driver.forward_backward(micro, 1 / targets)
    split = _grads(model)
    model.zero_grad(set_to_none=True)
    whole = driver.forward_backward([{"input_ids": ids, "labels": labels}], 1 / targets)
    torch.testing.assert_close(loss_sum, whole, atol=FP64_ATOL, rtol=0)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(split[name], grad, atol=FP64_ATOL, rtol=0, msg=name)


def test_a_step_sets_the_lrs_clips_steps_and_calls_the_method():
    model, driver = _full_driver()
    driver.max_grad_norm = 1e-3
    calls = []
    driver.method.on_step = lambda step, optimizer: calls.append((step, optimizer))
    before = [p.clone() for p in model.parameters()]
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    _, norm = driver.step(2, [{"input_ids": ids, "labels": ids}], 1 / 14)
    assert norm > 1e-3  # the norm before clipping
    assert calls == [(2, driver.optimizer)]
    group = driver.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(group["base_lr"] * WarmupCosine(4).factor(2))
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_every_registered_method_validates_and_has_a_recipe():
    for name in method_names():
        cls = method_class(name)
        assert cls.config_class(name=name).name == name
        assert (RECIPES / f"{name}.yaml").is_file(), name
        assert cls.export_kind in ("full", "adapter")
    assert [n for n in method_names() if exports_adapter(n)] == ["lora", "dora", "pissa"]
    assert build_method(method_class("lora").sized_config("lora", 4)).cfg.rank == 4


def test_a_name_registers_once():
    class Twin(FullMethod):
        names = ("full",)

    with pytest.raises(ValueError, match="registered twice"):
        register(Twin)
    assert method_class("full") is FullMethod


def test_percentile_interpolates_between_order_statistics():
    assert percentile([], 95) is None and percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0], 50) == pytest.approx(1.5)
    assert percentile([4.0, 1.0, 3.0, 2.0], 95) == pytest.approx(3.85)
