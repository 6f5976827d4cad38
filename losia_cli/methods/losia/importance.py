"""Importance scores for subnet localization (method doc 3.3).

Per matrix and per optimizer step of its scoring slot: I_t from the step's full weight gradient and the
weight the step's forward used; AdaLoRA-style EMAs starting at zero, no bias correction; at the end of
the slot S = I-bar * U-bar. Only the scoring layer holds these (m x n, fp32) buffers.
"""

from __future__ import annotations

import torch


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
    """I_t in fp32 (a new tensor)."""
    return sensitivity_(weight.float() * grad.float(), kind)


class Scorer:
    """The score state of one matrix during its scoring slot.

    `grad_acc` is filled by backward (summed over the micro-batches of one optimizer step); `update`
    folds it into the EMAs once per step and clears it.
    """

    def __init__(self, shape: tuple[int, int], device: torch.device, kind: str, beta1: float, beta2: float):
        self.kind, self.beta1, self.beta2 = kind, beta1, beta2
        self.grad_acc = torch.zeros(shape, dtype=torch.float32, device=device)
        self.ibar = torch.zeros(shape, dtype=torch.float32, device=device)
        self.ubar = torch.zeros(shape, dtype=torch.float32, device=device)
        self.weight: torch.Tensor | None = None  # the weight the step's forward used (set by the layer)

    @torch.no_grad()
    def update(self, weight: torch.Tensor | None = None) -> None:
        """One EMA step from the accumulated gradient and the weight the step's forward used (by
        default the one the layer recorded).

        Works in place in `grad_acc` (no m x n temporaries) and leaves it zeroed for the next step.
        """
        i_t = sensitivity_(self.grad_acc.mul_(self.weight if weight is None else weight), self.kind)
        self.ibar.lerp_(i_t, 1.0 - self.beta1)  # beta1 * ibar + (1 - beta1) * I_t
        self.ubar.lerp_(i_t.sub_(self.ibar).abs_(), 1.0 - self.beta2)
        self.grad_acc.zero_()

    def score(self) -> torch.Tensor:
        return self.ibar * self.ubar

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"grad_acc": self.grad_acc, "ibar": self.ibar, "ubar": self.ubar}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            getattr(self, key).copy_(value)
