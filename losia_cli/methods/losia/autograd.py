"""The LoSiA-Pro linear: full forward, compact weight gradient (docs/method.md 6.2 and 12).

Y = X W^T (+ b) is computed in full. Backward returns
  grad_X   = G W                      (the full weight, so earlier layers get the exact signal),
  grad_sub = G[:, R]^T X[:, C]        (|R| x |C|: p^2 of a dense weight-gradient GEMM),
  grad_b   = sum of G over all token dimensions,
and nothing for W, which is frozen. Only X[..., C] is kept between forward and backward, p of the
activation the dense layer would keep.

In scoring mode the full X is kept instead and the full G^T X is added into the scorer's fp32
accumulator in backward (so the micro-batches of one optimizer step sum); grad_sub is computed as above.

Dense form (non-Pro LoSiA): the full X is kept and backward forms the whole G^T X, from which grad_sub
is sliced: the paper's LoSiA cost, without a second copy of W held for backward.

Delta form (weights sharded by FSDP, where W is not written between re-localizations): W still
holds the block as it was when the block was chosen, and the layer adds D = sub - W[R, C] on the fly:
Y[..., R] += X[..., C] D^T and grad_X[..., C] += G[:, R] D, a p^2-sized GEMM each way.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def block_of(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """W[R, C] as a new tensor: one p^2 gather, no |R| x n intermediate."""
    return weight[rows[:, None], cols]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear computes in: autocast's where it is on, else the input's."""
    device = x.device.type
    if device != "meta" and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32. A low-precision GEMM on CUDA writes its fp32 accumulator out as it is (no
    rounding to bf16 and back; meta, the cost model, takes the same path); elsewhere the GEMM runs in
    the inputs' dtype."""
    if (a.is_cuda or a.is_meta) and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


def _forward(ctx, x, weight, sub, rows, cols, bias, grad_acc, delta, dense):
    # Cast once, as autocast would inside F.linear: the gather below then reads the compute dtype
    # (half the bytes under bf16) and what is kept for backward needs no second cast.
    x = x.to(_compute_dtype(x))
    y = F.linear(x, weight, bias)
    keep_all = dense or grad_acc is not None  # the full weight gradient is formed in backward
    x_cols = None
    if not keep_all or delta:
        # Indices are sorted and unique, so |C| = n means C = 0..n-1 (lm_head rows, p = 1): no copy.
        x_cols = x if cols.numel() == x.shape[-1] else x.index_select(-1, cols)
    d = None
    if delta:
        # W_eff[R, C] = sub in W's dtype, exactly what write-through would have stored there.
        d = (sub.detach().to(weight.dtype) - block_of(weight.detach(), rows, cols)).to(y.dtype)
        y.index_add_(-1, rows, torch.matmul(x_cols, d.t()))
    ctx.save_for_backward(x if keep_all else x_cols, weight, rows, cols, d)
    ctx.grad_acc = grad_acc
    ctx.dense = dense
    ctx.sub_dtype = sub.dtype
    return y


def _backward(ctx, grad_out):
    kept, weight, rows, cols, d = ctx.saved_tensors
    need_x, _, need_sub, _, _, need_bias, _, _, _ = ctx.needs_input_grad
    g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (N, m): every leading dim is a token dim
    kept2 = kept.reshape(-1, kept.shape[-1])

    grad_x = grad_sub = grad_bias = None
    if need_x:
        grad_x = torch.mm(g2, weight)
        if d is not None:
            grad_x.index_add_(1, cols, torch.mm(g2.index_select(1, rows), d))
        grad_x = grad_x.view(*grad_out.shape[:-1], weight.shape[1])
    if ctx.dense:
        # Non-Pro: the dense weight gradient, sliced (and, while scoring, also summed for the scorer).
        full = torch.mm(g2.t(), kept2)
        if ctx.grad_acc is not None:
            ctx.grad_acc.add_(full)
        if need_sub:
            grad_sub = block_of(full, rows, cols).to(ctx.sub_dtype)
    else:
        if ctx.grad_acc is not None:
            # The dense weight gradient, only for the scoring layer: straight into the accumulator.
            if g2.dtype == ctx.grad_acc.dtype:
                ctx.grad_acc.addmm_(g2.t(), kept2)
            else:  # low-precision compute: the sum stays fp32
                ctx.grad_acc.add_(_mm_fp32(g2.t(), kept2))
        if need_sub:
            kept_cols = kept2 if ctx.grad_acc is None else kept2.index_select(1, cols)
            g_rows = g2.index_select(1, rows).t()
            if ctx.sub_dtype == torch.float32:
                grad_sub = _mm_fp32(g_rows, kept_cols)
            else:
                grad_sub = torch.mm(g_rows, kept_cols).to(ctx.sub_dtype)
    if need_bias:
        grad_bias = g2.sum(0)
    return grad_x, None, grad_sub, None, None, grad_bias, None, None, None


@functools.cache
def _function_for(device_type: str) -> type[torch.autograd.Function]:
    """custom_fwd/custom_bwd take the autocast device type at decoration time, hence one class per device.

    custom_bwd runs backward under the autocast state the forward saw, so its GEMMs use the same dtype.
    """

    class SubnetLinearFunction(torch.autograd.Function):
        forward = staticmethod(torch.amp.custom_fwd(device_type=device_type)(_forward))
        backward = staticmethod(torch.amp.custom_bwd(device_type=device_type)(_backward))

    SubnetLinearFunction.__name__ = f"SubnetLinearFunction_{device_type}"
    return SubnetLinearFunction


def subnet_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    sub: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    bias: torch.Tensor | None = None,
    grad_acc: torch.Tensor | None = None,
    delta: bool = False,
    dense: bool = False,
) -> torch.Tensor:
    """F.linear(x, weight, bias) whose weight gradient lands only in `sub` (= weight[rows][:, cols]).

    `weight` is (out, in) and must already hold `sub` at [rows, cols] (write-through), or `delta` adds
    the difference on the fly. With `grad_acc` (an fp32 (out, in) buffer) the layer is in scoring mode.
    `dense` (non-Pro LoSiA) forms the whole weight gradient and slices it, keeping the full X.
    """
    # Autocast knows no `meta` (the cost model); nothing autocasts there, as on a CPU without autocast.
    device = "cpu" if x.device.type == "meta" else x.device.type
    return _function_for(device).apply(x, weight, sub, rows, cols, bias, grad_acc, delta, dense)
