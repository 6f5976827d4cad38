"""The scorer update compiled into one kernel (torch.compile, CUDA's default) against the eager one,
here on inductor's CPU backend; its fallback to eager when compiling fails; LOSIA_COMPILE_SCORER."""

from __future__ import annotations

import pytest
import torch

from losia_cli.methods.losia import importance
from losia_cli.methods.losia.importance import Scorer, compile_by_default

# I_t written out independently of importance.py (docs/method.md 3.3).
SENSITIVITY = {
    "param_mix": lambda wg: (wg - wg**2 / 2).abs(), "param_first": torch.abs, "param_second": torch.square,
}


def assert_compiled_matches_eager(device: torch.device, kind: str, weight_dtype: torch.dtype,
                                  transposed: bool = False) -> None:
    """Three updates of an eager and a compiled scorer from the same gradients agree within 1e-6, and
    with the EMAs written out in fp64."""
    torch.manual_seed(0)
    shape = (24, 40)
    weight = torch.randn(shape[::-1] if transposed else shape, device=device).to(weight_dtype)
    weight = weight.t() if transposed else weight  # Conv1D's (out, in) view of its (in, out) weight
    beta1, beta2 = 0.85, 0.95  # unequal, so a swap shows
    eager, fused = (Scorer(shape, device, kind, beta1, beta2) for _ in range(2))
    ibar = ubar = torch.zeros(shape, dtype=torch.float64, device=device)
    for _ in range(3):
        grad = torch.randn(shape, device=device)
        for scorer, compiled in ((eager, False), (fused, True)):
            scorer.grad_acc.copy_(grad)
            scorer.update(weight, compiled=compiled)
        i_t = SENSITIVITY[kind](weight.double() * grad.double())
        ibar = beta1 * ibar + (1 - beta1) * i_t
        ubar = beta2 * ubar + (1 - beta2) * (i_t - ibar).abs()
    assert importance._compile_failure is None
    assert not fused.grad_acc.any()
    torch.testing.assert_close(fused.ibar, eager.ibar, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused.ubar, eager.ubar, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused.ibar, ibar.float())
    torch.testing.assert_close(fused.ubar, ubar.float())


@pytest.mark.parametrize(
    "kind, weight_dtype, transposed",
    [("param_mix", torch.float32, False), ("param_first", torch.bfloat16, True),
     ("param_second", torch.float32, False)],
)
def test_compiled_update_matches_eager(kind, weight_dtype, transposed):
    assert_compiled_matches_eager(torch.device("cpu"), kind, weight_dtype, transposed)


def test_a_compile_failure_warns_once_and_updates_eagerly(monkeypatch):
    calls = []

    def failing(*args):
        calls.append(args)
        raise RuntimeError("Cannot find a working triton installation.\nMore details follow.")

    monkeypatch.setattr(importance, "_compiled", lambda *constants: failing)
    monkeypatch.setattr(importance, "_compile_failure", None)
    weight = torch.randn(6, 5)
    eager, fallback = (Scorer((6, 5), torch.device("cpu"), "param_mix", 0.85, 0.95) for _ in range(2))
    with pytest.warns(RuntimeWarning, match="LoSiA scorer") as record:
        for _ in range(2):
            grad = torch.randn(6, 5)
            for scorer, compiled in ((eager, False), (fallback, True)):
                scorer.grad_acc.copy_(grad)
                scorer.update(weight, compiled=compiled)
    ours = [str(w.message) for w in record if "LoSiA scorer" in str(w.message)]
    assert ours == ["LoSiA scorer: torch.compile failed (RuntimeError: Cannot find a working triton "
                    "installation.); updating eagerly instead"]
    assert len(calls) == 1  # not retried
    for key, value in eager.state_dict().items():
        assert torch.equal(fallback.state_dict()[key], value), key


def test_compiles_by_default_on_cuda_only(monkeypatch):
    monkeypatch.delenv("LOSIA_COMPILE_SCORER", raising=False)
    assert compile_by_default(torch.device("cuda")) and not compile_by_default(torch.device("cpu"))
    monkeypatch.setenv("LOSIA_COMPILE_SCORER", "0")
    assert not compile_by_default(torch.device("cuda"))
