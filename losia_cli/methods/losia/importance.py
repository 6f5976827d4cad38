"""Importance scores for subnet localization (docs/method.md 3.3).

Per matrix and per optimizer step of its scoring slot: I_t from the step's full weight gradient and the
weight the step's forward used; AdaLoRA-style EMAs starting at zero, no bias correction; at the end of
the slot S = I-bar * U-bar. Only the scoring layer holds these m x n buffers (fp32; fp64 for fp64
weights).

The update is elementwise, so memory traffic is its cost. Eager it runs 8 kernels (6 for param_first
and param_second) that together move 19 (17) m x n fp32 tensors' worth of bytes. On CUDA it runs as one
kernel compiled by torch.compile (inductor): it reads grad_acc, W, I-bar and U-bar and writes grad_acc,
I-bar and U-bar once each, 7. At 7B's 11008 x 4096 scoring layer (180 MB per tensor) that is 3.4 GB ->
1.3 GB per step. CPU stays eager (bit-exact with the reference implementation); LOSIA_COMPILE_SCORER=0
keeps CUDA eager too. If compiling fails (no triton, a dynamo error, more distinct shapes than dynamo's
recompile limit) the update warns once and stays eager for the rest of the process.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores, score sums and the trained block keep: fp32 for bf16/fp16/fp32 weights (low
    precision would round small importances away), the weight's own for fp64 (no silent downcast)."""
    return torch.promote_types(dtype, torch.float32)


def sensitivity_(wg: torch.Tensor, kind: str = "param_mix") -> torch.Tensor:
    """I_t from W*G, computed in place in `wg`: param_mix |WG - (WG)^2/2|, param_first |WG|,
    param_second (WG)^2."""
    if kind == "param_mix":
        return wg.addcmul_(wg, wg, value=-0.5).abs_()
    if kind == "param_first":
        return wg.abs_()
    if kind == "param_second":
        return wg.mul_(wg)
    raise ValueError(f"unknown importance {kind!r}")


def sensitivity(weight: torch.Tensor, grad: torch.Tensor, kind: str = "param_mix") -> torch.Tensor:
    """I_t in at least fp32 (a new tensor)."""
    dtype = at_least_fp32(torch.promote_types(weight.dtype, grad.dtype))
    return sensitivity_(weight.to(dtype) * grad.to(dtype), kind)


def ema_step_(grad_acc: torch.Tensor, weight: torch.Tensor, ibar: torch.Tensor, ubar: torch.Tensor,
              kind: str, beta1: float, beta2: float) -> None:
    """One EMA step, in place: I-bar and U-bar advance from I_t(grad_acc, weight), grad_acc ends zeroed.

    Eager it needs no m x n temporaries (I_t lives in grad_acc); compiled, inductor turns the same
    in-place ops into one kernel that writes the three buffers' final values.
    """
    i_t = sensitivity_(grad_acc.mul_(weight), kind)
    ibar.lerp_(i_t, 1.0 - beta1)  # beta1 * ibar + (1 - beta1) * I_t
    ubar.lerp_(i_t.sub_(ibar).abs_(), 1.0 - beta2)
    grad_acc.zero_()


@functools.cache
def _compiled(kind: str, beta1: float, beta2: float) -> Callable[..., None]:
    """`ema_step_` with the importance kind and betas baked in as constants, compiled lazily (at the
    first call, once per distinct shape and dtype)."""

    def step(grad_acc, weight, ibar, ubar):
        ema_step_(grad_acc, weight, ibar, ubar, kind, beta1, beta2)

    return torch.compile(step, fullgraph=True, dynamic=False)


_compile_failure: str | None = None  # why compiling failed once in this process; then eager for good


def _step_compiled(args: tuple[torch.Tensor, ...], kind: str, beta1: float, beta2: float) -> bool:
    """Run the compiled step; False (warning the first time) if it cannot be compiled."""
    global _compile_failure
    if _compile_failure is not None:
        return False
    try:
        _compiled(kind, beta1, beta2)(*args)
        return True
    except Exception as exc:
        # Broad on purpose: a training run must not stop over an optimization, and a compile error is
        # raised before the kernel writes anything, so the eager step after it starts from the same buffers.
        first_line = next(iter(str(exc).strip().splitlines()), "")
        _compile_failure = f"{type(exc).__name__}: {first_line}"
        warnings.warn(f"LoSiA scorer: torch.compile failed ({_compile_failure}); updating eagerly instead",
                      RuntimeWarning, stacklevel=2)
        return False


def compile_by_default(device: torch.device) -> bool:
    """Whether `Scorer.update` compiles on this device: on CUDA, unless LOSIA_COMPILE_SCORER=0."""
    return device.type == "cuda" and os.environ.get("LOSIA_COMPILE_SCORER", "1") != "0"


class Scorer:
    """The score state of one matrix during its scoring slot.

    `grad_acc` is filled by backward (summed over the micro-batches of one optimizer step); `update`
    folds it into the EMAs once per step and clears it.
    """

    def __init__(self, shape: tuple[int, int], device: torch.device, kind: str, beta1: float, beta2: float,
                 dtype: torch.dtype = torch.float32):
        self.kind, self.beta1, self.beta2 = kind, beta1, beta2
        dtype = at_least_fp32(dtype)
        self.grad_acc = torch.zeros(shape, dtype=dtype, device=device)
        self.ibar = torch.zeros(shape, dtype=dtype, device=device)
        self.ubar = torch.zeros(shape, dtype=dtype, device=device)
        self.weight: torch.Tensor | None = None  # the weight the step's forward used (set by the layer)
        self.fed = False  # whether a forward ran in scoring mode since the last update (an idle expert's did not)

    @torch.no_grad()
    def update(self, weight: torch.Tensor | None = None, *, compiled: bool | None = None) -> None:
        """One EMA step (`ema_step_`) from the accumulated gradient and the weight the step's forward
        used (by default the one the layer recorded); leaves `grad_acc` zeroed for the next step.

        compiled: run it as one compiled kernel; by default on CUDA only (`compile_by_default`).
        """
        args = (self.grad_acc, self.weight if weight is None else weight, self.ibar, self.ubar)
        if compiled is None:
            compiled = compile_by_default(self.grad_acc.device)
        if not (compiled and _step_compiled(args, self.kind, self.beta1, self.beta2)):
            ema_step_(*args, self.kind, self.beta1, self.beta2)
        self.fed = False

    def score(self) -> torch.Tensor:
        return self.ibar * self.ubar

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"grad_acc": self.grad_acc, "ibar": self.ibar, "ubar": self.ubar}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            getattr(self, key).copy_(value)
