"""`SubnetLinear`: a linear layer whose weight trains only on the block W[R, C] (method doc 12).

The original weight stays the (now frozen) parameter `weight`, so the model's state dict keeps its keys
and `export` only has to unwrap. The trainable block is `sub` (|R| x |C|, fp32 master copy by default);
R and C are persistent int64 buffers. None of the three ever changes shape or identity, so optimizer
references, DDP buckets and checkpoints stay valid across re-localizations.

Write-through: after every optimizer step the method copies `sub` into W[R, C]; the forward therefore
always sees the trained weight in W itself and costs what a plain linear costs.

Modes (`mode`):
  compact  (Pro)      the compact autograd function, keeps X[..., C], computes only the block gradient;
  dense    (non-Pro)  plain autograd through W_eff = W with `sub` scattered into [R, C]: the dense weight
                      gradient is formed and autograd slices it; the obviously-correct reference;
  scoring             the layer's scoring slot: the full weight gradient also goes into the scorer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import subnet_linear
from .importance import Scorer


def is_conv1d(module: nn.Module) -> bool:
    """HF's GPT-2 style Conv1D (weight stored as (in, out)); checked by name so transformers stays lazy."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class SubnetLinear(nn.Module):
    def __init__(
        self, base: nn.Module, rows: torch.Tensor, cols: torch.Tensor, *, pro: bool, fp32_sub: bool = True
    ):
        super().__init__()
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise TypeError(f"SubnetLinear wraps nn.Linear or transformers Conv1D, not {type(base).__name__}")
        self.transposed = is_conv1d(base)
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", base.bias)
        device = self.weight.device
        self.register_buffer("rows", rows.to(device=device, dtype=torch.int64).clone())
        self.register_buffer("cols", cols.to(device=device, dtype=torch.int64).clone())
        block = self._gather(self.rows, self.cols)
        self.sub = nn.Parameter(block.float() if fp32_sub else block.clone())
        self.pro = pro
        self.scorer: Scorer | None = None

    # --- shapes --------------------------------------------------------------------------------------
    @property
    def weight_oi(self) -> torch.Tensor:
        """The weight as (out, in), a view for Conv1D."""
        return self.weight.t() if self.transposed else self.weight

    @property
    def out_features(self) -> int:
        return self.weight_oi.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight_oi.shape[1]

    @property
    def mode(self) -> str:
        if self.scorer is not None:
            return "scoring"
        return "compact" if self.pro else "dense"

    def extra_repr(self) -> str:
        return (
            f"out={self.out_features}, in={self.in_features}, block={tuple(self.sub.shape)}, "
            f"bias={self.bias is not None}, mode={self.mode}"
        )

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_oi
        if not (torch.is_grad_enabled() and self.sub.requires_grad):
            # Evaluation, or the no-grad first pass of reentrant checkpointing: W already holds `sub`.
            return F.linear(x, weight, self.bias)
        if self.pro:
            grad_acc = None if self.scorer is None else self.scorer.grad_acc
            return subnet_linear(x, weight, self.sub, self.rows, self.cols, self.bias, grad_acc)
        # Dense reference: numerically W_eff == W (write-through), but autograd now routes the [R, C]
        # slice of the dense gradient to `sub` and nothing to the frozen W.
        w_eff = weight.index_put((self.rows[:, None], self.cols), self.sub.to(weight.dtype))
        if self.scorer is not None:
            grad_acc = self.scorer.grad_acc

            def add_to_score(grad: torch.Tensor) -> None:
                grad_acc.add_(grad)

            w_eff.register_hook(add_to_score)
        return F.linear(x, w_eff, self.bias)

    # --- between steps -------------------------------------------------------------------------------
    def _gather(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self.weight_oi.detach().index_select(0, rows).index_select(1, cols)

    @torch.no_grad()
    def write_through(self) -> None:
        """W[R, C] <- sub, in W's dtype."""
        weight = self.weight_oi
        weight.index_put_((self.rows[:, None], self.cols), self.sub.to(weight.dtype))

    @torch.no_grad()
    def set_block(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Move the block (W must already hold the trained `sub`); indices and `sub` change in place."""
        self.rows.copy_(rows)
        self.cols.copy_(cols)
        self.sub.copy_(self._gather(self.rows, self.cols))

    def start_scoring(self, kind: str, beta1: float, beta2: float) -> None:
        self.scorer = Scorer(tuple(self.weight_oi.shape), self.weight.device, kind, beta1, beta2)

    def stop_scoring(self) -> None:
        self.scorer = None

    def to_plain(self) -> nn.Module:
        """The nn.Linear (or Conv1D) this layer stands for, sharing W and b (they hold the trained values)."""
        if self.transposed:
            from transformers.pytorch_utils import Conv1D

            plain = Conv1D(self.out_features, self.in_features)
        else:
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = self.weight
        plain.bias = self.bias
        return plain
