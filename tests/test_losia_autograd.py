"""The compact autograd function and SubnetLinear against a dense nn.Linear (docs/method.md 6.2, 12)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from losia_cli.methods.losia.layer import SubnetLinear
from test_losia_support import one_thread  # noqa: F401  (autouse fixture)
from test_losia_support import FP64_ATOL, MODELS, batch, build

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INPUT_SHAPES = {"2d": (12,), "3d": (2, 6), "4d": (2, 3, 2)}  # leading (token) dims


def layer0_linears(kind: str, dtype: torch.dtype = torch.float32) -> dict[str, nn.Linear]:
    model = MODELS[kind]().to(dtype)
    layer = model.model.layers[0]
    return {name: getattr(layer.self_attn if name[0] in "qkvo" else layer.mlp, name) for name in PROJECTIONS}


def random_block(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(m, generator=generator)[: max(1, m // 4)].sort().values
    cols = torch.randperm(n, generator=generator)[: max(1, n // 4)].sort().values
    return rows, cols


def dense_and_subnet(linear: nn.Linear, pro: bool, seed: int = 0, delta: bool = False):
    """A trainable dense copy (weight and bias) and a SubnetLinear over another copy, same values."""
    dense = copy.deepcopy(linear).requires_grad_(True)
    rows, cols = random_block(*linear.weight.shape, seed)
    wrapped = SubnetLinear(copy.deepcopy(linear), rows, cols, pro=pro, delta=delta)
    if wrapped.bias is not None:
        wrapped.bias.requires_grad_(True)
    return dense, wrapped


def run_both(dense, wrapped, lead: tuple[int, ...], dtype=torch.float32):
    x = torch.randn(*lead, dense.in_features, dtype=dtype)
    grad_out = torch.randn(*lead, dense.out_features, dtype=dtype)
    x_dense, x_sub = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_dense, y_sub = dense(x_dense), wrapped(x_sub)
    y_dense.backward(grad_out)
    y_sub.backward(grad_out)
    return (x_dense, y_dense), (x_sub, y_sub)


@pytest.mark.parametrize("kind", ["llama", "gemma", "qwen2"])
@pytest.mark.parametrize("shape", list(INPUT_SHAPES))
@pytest.mark.parametrize("pro", [True, False], ids=["pro", "dense"])
def test_block_gradient_is_the_dense_slice(kind, shape, pro):
    """In fp64: the block GEMM sums the same products as the dense one, in an order BLAS chooses."""
    for name, linear in layer0_linears(kind, torch.float64).items():
        dense, wrapped = dense_and_subnet(linear, pro)
        (x_dense, y_dense), (x_sub, y_sub) = run_both(dense, wrapped, INPUT_SHAPES[shape], torch.float64)
        rows, cols = wrapped.rows, wrapped.cols
        assert torch.equal(y_sub, y_dense), name
        torch.testing.assert_close(x_sub.grad, x_dense.grad, atol=FP64_ATOL, rtol=0)
        torch.testing.assert_close(wrapped.sub.grad, dense.weight.grad[rows][:, cols], atol=FP64_ATOL, rtol=0)
        assert wrapped.weight.grad is None
        if dense.bias is not None:  # qwen2 q/k/v
            torch.testing.assert_close(wrapped.bias.grad, dense.bias.grad, atol=FP64_ATOL, rtol=0)


def test_qwen2_has_biases_to_check():
    assert layer0_linears("qwen2")["q_proj"].bias is not None


@pytest.mark.parametrize("pro", [True, False], ids=["pro", "dense"])
def test_scoring_accumulates_the_full_gradient_over_micro_batches(pro):
    linear = layer0_linears("qwen2", torch.float64)["k_proj"]
    dense, wrapped = dense_and_subnet(linear, pro)
    wrapped.start_scoring("param_mix", 0.85, 0.85)
    assert wrapped.mode == "scoring"
    for micro in range(2):  # gradient accumulation: both sides sum (in another order: fp64)
        run_both(dense, wrapped, (2, 5), torch.float64)
    torch.testing.assert_close(wrapped.scorer.grad_acc, dense.weight.grad, atol=FP64_ATOL, rtol=0)
    torch.testing.assert_close(
        wrapped.sub.grad, dense.weight.grad[wrapped.rows][:, wrapped.cols], atol=FP64_ATOL, rtol=0
    )


@pytest.mark.parametrize("scoring", [False, True], ids=["compact", "scoring"])
@pytest.mark.parametrize("pro", [True, False], ids=["pro", "dense"])
def test_delta_form_is_the_layer_write_through_would_give(pro, scoring):
    """Delta form: W keeps the block it had when the block was chosen and the layer adds sub - W[R, C]
    on the fly. Outputs and gradients equal a dense layer holding `sub` at [R, C], and W is untouched."""
    # In fp64: the extra block GEMM adds the same products in another order.
    dense, wrapped = dense_and_subnet(layer0_linears("qwen2", torch.float64)["q_proj"], pro, delta=True)
    rows, cols = wrapped.rows, wrapped.cols
    with torch.no_grad():
        wrapped.sub.add_(torch.randn_like(wrapped.sub))  # trained since the block was chosen
        dense.weight[rows[:, None], cols] = wrapped.sub
    stale = wrapped.weight.clone()
    if scoring:
        wrapped.start_scoring("param_mix", 0.85, 0.85)
    (x_dense, y_dense), (x_sub, y_sub) = run_both(dense, wrapped, (2, 5), torch.float64)
    torch.testing.assert_close(y_sub, y_dense, atol=FP64_ATOL, rtol=0)
    torch.testing.assert_close(x_sub.grad, x_dense.grad, atol=FP64_ATOL, rtol=0)
    torch.testing.assert_close(wrapped.sub.grad, dense.weight.grad[rows][:, cols], atol=FP64_ATOL, rtol=0)
    torch.testing.assert_close(wrapped.bias.grad, dense.bias.grad, atol=FP64_ATOL, rtol=0)
    if scoring:  # the score weighs the full gradient by the weight the forward used
        torch.testing.assert_close(wrapped.scorer.grad_acc, dense.weight.grad, atol=FP64_ATOL, rtol=0)
        assert torch.equal(wrapped.scorer.weight, dense.weight)
    assert torch.equal(wrapped.weight, stale)
    x = torch.randn(3, dense.in_features, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), dense(x), atol=FP64_ATOL, rtol=0)
        wrapped.write_through()
    assert torch.equal(wrapped.weight, dense.weight)


def test_delta_form_under_bf16_autocast():
    dense, wrapped = dense_and_subnet(layer0_linears("llama")["up_proj"], pro=True, delta=True)
    with torch.no_grad():
        wrapped.sub.add_(torch.randn_like(wrapped.sub))
        dense.weight[wrapped.rows[:, None], wrapped.cols] = wrapped.sub
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (x_dense, y_dense), (x_sub, y_sub) = run_both(dense, wrapped, (3, 7))
    assert y_sub.dtype == torch.bfloat16 and wrapped.sub.grad.dtype == torch.float32
    torch.testing.assert_close(y_sub, y_dense, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(x_sub.grad, x_dense.grad, atol=5e-2, rtol=2e-2)
    dense_block = dense.weight.grad[wrapped.rows][:, wrapped.cols]
    torch.testing.assert_close(wrapped.sub.grad, dense_block, atol=5e-2, rtol=2e-2)


def saved_tensor_shapes(module: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return shapes


def test_compact_mode_keeps_only_the_block_columns_of_the_input():
    linear = layer0_linears("llama")["gate_proj"]  # 64 x 32
    _, wrapped = dense_and_subnet(linear, pro=True)
    x = torch.randn(2, 6, 32, requires_grad=True)
    shapes = saved_tensor_shapes(wrapped, x)
    assert (2, 6, len(wrapped.cols)) in shapes
    assert (2, 6, 32) not in shapes
    wrapped.start_scoring("param_mix", 0.85, 0.85)
    assert (2, 6, 32) in saved_tensor_shapes(wrapped, x)


def test_bf16_autocast():
    linear = layer0_linears("qwen2")["v_proj"]
    dense, wrapped = dense_and_subnet(linear, pro=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (x_dense, y_dense), (x_sub, y_sub) = run_both(dense, wrapped, (3, 7))
    assert y_sub.dtype == torch.bfloat16 and wrapped.sub.grad.dtype == torch.float32
    assert x_sub.grad.dtype == torch.float32
    torch.testing.assert_close(y_sub, y_dense)
    torch.testing.assert_close(x_sub.grad, x_dense.grad, atol=2e-2, rtol=2e-2)
    dense_block = dense.weight.grad[wrapped.rows][:, wrapped.cols]
    torch.testing.assert_close(wrapped.sub.grad, dense_block, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(wrapped.bias.grad, dense.bias.grad, atol=5e-2, rtol=2e-2)


def test_bf16_weights_with_fp32_master_block():
    linear = copy.deepcopy(layer0_linears("llama")["o_proj"]).to(torch.bfloat16)
    dense, wrapped = dense_and_subnet(linear, pro=True)
    assert wrapped.sub.dtype == torch.float32 and wrapped.weight.dtype == torch.bfloat16
    (_, y_dense), (_, y_sub) = run_both(dense, wrapped, (4, 5), dtype=torch.bfloat16)
    assert torch.equal(y_sub, y_dense)
    assert wrapped.sub.grad.dtype == torch.float32
    torch.testing.assert_close(
        wrapped.sub.grad, dense.weight.grad[wrapped.rows][:, wrapped.cols].float(), atol=5e-2, rtol=2e-2
    )


def test_conv1d_transposed_weight():
    conv = Conv1D(24, 16).double()  # nf=24 outputs, nx=16 inputs, weight (16, 24); fp64 as above
    torch.nn.init.normal_(conv.bias)
    dense = nn.Linear(16, 24, dtype=torch.float64)
    dense.weight.data.copy_(conv.weight.t())
    dense.bias.data.copy_(conv.bias)
    rows, cols = random_block(24, 16)
    wrapped = SubnetLinear(conv, rows, cols, pro=True)
    wrapped.bias.requires_grad_(True)
    assert (wrapped.out_features, wrapped.in_features) == (24, 16)
    (x_dense, y_dense), (x_sub, y_sub) = run_both(dense, wrapped, (2, 5), torch.float64)
    torch.testing.assert_close(y_sub, y_dense, atol=FP64_ATOL, rtol=0)
    torch.testing.assert_close(x_sub.grad, x_dense.grad, atol=FP64_ATOL, rtol=0)
    torch.testing.assert_close(wrapped.sub.grad, dense.weight.grad[rows][:, cols], atol=FP64_ATOL, rtol=0)
    with torch.no_grad():
        wrapped.sub.add_(1.0)
    wrapped.write_through()
    assert torch.equal(conv.weight.t()[rows][:, cols], wrapped.sub)
    assert isinstance(wrapped.to_plain(), Conv1D)


def test_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        SubnetLinear(nn.Conv2d(2, 2, 1), torch.tensor([0]), torch.tensor([0]), pro=True)


def block_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    model, method = build(name="losia_pro", dtype=torch.float64)  # recomputed sums may round apart: fp64
    ids = batch(0, 0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    plain_grads = block_grads(model)
    plain_score = {t.name: t.module.scorer.grad_acc.clone() for t in method.targets if t.module.scorer}
    model.zero_grad(set_to_none=True)
    for t in method.targets:
        if t.module.scorer:
            t.module.scorer.grad_acc.zero_()

    # activation_checkpointing_enable: gradient_checkpointing_enable's new name in transformers 5
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    calls = []
    method.targets[0].module.register_forward_hook(lambda *args: calls.append(1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2  # the layer really was recomputed in backward
    checkpointed = block_grads(model)
    assert plain_score and set(checkpointed) == set(plain_grads)
    assert all(name.endswith(".sub") for name in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=FP64_ATOL, rtol=0)
    for t in method.targets:  # recomputation must not count a scoring sample twice
        if t.module.scorer:
            torch.testing.assert_close(t.module.scorer.grad_acc, plain_score[t.name], atol=FP64_ATOL, rtol=0)


def test_dense_mode_keeps_no_copy_of_the_weight():
    """Non-Pro keeps X and W itself for backward, never a second (out, in) tensor (W_eff)."""
    linear = layer0_linears("llama")["gate_proj"]  # 64 x 32
    _, wrapped = dense_and_subnet(linear, pro=False)
    weight_shaped = []

    def pack(tensor):
        if tensor.numel() == wrapped.weight.numel():  # also W^T views
            weight_shaped.append(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        wrapped(torch.randn(2, 6, 32, requires_grad=True))
    assert set(weight_shaped) <= {wrapped.weight.untyped_storage().data_ptr()}


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_write_through_follows_loaded_blocks(transposed):
    """The cached flat indices of W[R, C] are rebuilt when R and C are loaded in place (resume)."""
    base = Conv1D(24, 16) if transposed else nn.Linear(16, 24)
    wrapped = SubnetLinear(base, *random_block(24, 16, seed=0), pro=True)
    wrapped.write_through()  # caches the indices of the first block
    other = SubnetLinear(copy.deepcopy(base), *random_block(24, 16, seed=1), pro=True)
    wrapped.load_state_dict(other.state_dict())
    with torch.no_grad():
        wrapped.sub.add_(1.0)
    wrapped.write_through()
    assert torch.equal(wrapped.weight_oi[wrapped.rows][:, wrapped.cols], wrapped.sub)
