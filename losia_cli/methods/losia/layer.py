"""`SubnetLinear`: a linear layer whose weight trains only on the block W[R, C] (docs/method.md 12).

The original weight stays the (now frozen) parameter `weight`, so the model's state dict keeps its keys
and `export` only has to unwrap. The trainable block is `sub` (|R| x |C|, fp32 master copy by default);
R and C are persistent int64 buffers. None of the three ever changes shape or identity, so optimizer
references, DDP buckets and checkpoints stay valid across re-localizations.

Write-through: after every optimizer step the method copies `sub` into W[R, C]; the forward therefore
always sees the trained weight in W itself and costs what a plain linear costs.

Delta (`delta=True`, for FSDP, which shards W): W is written only when the block moves and at
the end; in between, the forward adds sub - W[R, C] on the fly (autograd.py). Writes to W then go
through `full_weights()`, which gathers the shards and writes them back.

Modes (`mode`):
  compact  (Pro)      the compact autograd function, keeps X[..., C], computes only the block gradient;
  dense    (non-Pro)  the same function, but backward forms the dense weight gradient and slices it
                      (keeps the full X, as a plain linear does);
  scoring             the layer's scoring slot: the full weight gradient also goes into the scorer.

Mixture-of-experts (`SubnetExperts`): transformers 5 keeps a block's experts as 3-D parameters (one
(out, in) matrix per expert). Each expert's matrix is a `SubnetLinear` of its own over a view of the 3-D
parameter, with its own block, `sub` and scorer; the experts' loop calls only the experts that received
tokens, so an idle expert's `sub` gets no gradient (AdamW skips it: no update, no decay) and its scorer
is not fed (no score for that step).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from losia_cli.methods.targets import is_conv1d, is_linear

from .autograd import block_of, subnet_linear
from .importance import Scorer, at_least_fp32


class SubnetLinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        rows: torch.Tensor,
        cols: torch.Tensor,
        *,
        pro: bool,
        fp32_sub: bool = True,
        delta: bool = False,
    ):
        super().__init__()
        if not (is_linear(base) or isinstance(base, ExpertMatrix)):
            raise TypeError(f"SubnetLinear wraps nn.Linear or transformers Conv1D, not {type(base).__name__}")
        self.transposed = is_conv1d(base)
        self.weight = base.weight  # an expert's view is a plain attribute: the 3-D parameter stays its module's
        self.weight.requires_grad_(False)
        self.register_parameter("bias", base.bias)
        device = self.weight.device
        self.register_buffer("rows", rows.to(device=device, dtype=torch.int64).clone())
        self.register_buffer("cols", cols.to(device=device, dtype=torch.int64).clone())
        block = block_of(self.weight_oi.detach(), self.rows, self.cols)
        self.sub = nn.Parameter(block.to(at_least_fp32(block.dtype)) if fp32_sub else block.clone())
        self.pro = pro
        self.delta = delta
        self.scorer: Scorer | None = None
        self._flat_key: tuple | None = None  # see _flat_index

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
            f"bias={self.bias is not None}, mode={self.mode}{', delta' if self.delta else ''}"
        )

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_oi
        if not (torch.is_grad_enabled() and self.sub.requires_grad):
            # Evaluation, or the no-grad first pass of reentrant checkpointing: W holds `sub` (or,
            # in delta form, takes it here).
            return F.linear(x, self._effective(weight) if self.delta else weight, self.bias)
        if self.delta and self.scorer is not None:
            # The score weighs the step's gradient by the weight its forward used. With write-through
            # W itself still holds that at on_step (start_scoring points the scorer at it); in the
            # delta form W lacks the trained block, so the scorer keeps this copy.
            self.scorer.weight = self._effective(weight.detach())
        grad_acc = None
        if self.scorer is not None:
            grad_acc = self.scorer.grad_acc
            self.scorer.fed = True
        return subnet_linear(x, weight, self.sub, self.rows, self.cols, self.bias, grad_acc, self.delta,
                             dense=not self.pro)

    def _effective(self, weight: torch.Tensor) -> torch.Tensor:
        """W with `sub` at [R, C] (a new tensor; the delta form's evaluation and scoring weight)."""
        return weight.index_put((self.rows[:, None], self.cols), self.sub.to(weight.dtype))

    # --- between steps -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def full_weights(self):
        """(W as out x in, `sub`), whole and writable, written back to this rank's shards on exit.

        Under FSDP2 both are DTensors sharded over the ranks; this is then a collective, entered by
        every rank for the same layers in the same order.
        """
        if not isinstance(self.weight, DTensor):
            yield self.weight_oi, self.sub
            return
        weight, sub = self.weight.full_tensor(), self.sub.full_tensor()
        yield (weight.t() if self.transposed else weight), sub
        for param, full in ((self.weight, weight), (self.sub, sub)):
            _store_shard(param, full)

    @torch.no_grad()
    def write_through(self) -> None:
        """W[R, C] <- sub, in W's dtype: one p^2-sized copy through the cached flat indices."""
        if isinstance(self.weight, DTensor):
            with self.full_weights() as (weight, sub):
                weight.index_put_((self.rows[:, None], self.cols), sub.to(weight.dtype))
            return
        self.weight.view(-1).index_copy_(0, self._flat_index(), self.sub.reshape(-1).to(self.weight.dtype))

    def _flat_index(self) -> torch.Tensor:
        """Offsets of W[R, C] in W's storage (row-major (|R|, |C|), like `sub`), rebuilt when R or C
        change (a block move or a loaded state: their version counters) or move (`.to()`)."""
        key = tuple((t.data_ptr(), t._version) for t in (self.rows, self.cols))
        if key != self._flat_key:
            rows, cols = self.rows[:, None], self.cols[None, :]
            # Conv1D stores W as (in, out): W_oi[r, c] sits at c * out + r.
            self._flat = cols * self.out_features + rows if self.transposed else rows * self.in_features + cols
            self._flat = self._flat.reshape(-1)
            self._flat_key = key
        return self._flat

    @torch.no_grad()
    def move_block(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Write the trained block into W, then train (rows, cols) from W's values there; indices and
        `sub` change in place."""
        with self.full_weights() as (weight, sub):
            weight.index_put_((self.rows[:, None], self.cols), sub.to(weight.dtype))
            self.rows.copy_(rows)
            self.cols.copy_(cols)
            sub.copy_(block_of(weight, rows, cols))

    def start_scoring(self, kind: str, beta1: float, beta2: float) -> None:
        self.scorer = Scorer(tuple(self.weight_oi.shape), self.weight.device, kind, beta1, beta2, self.weight.dtype)
        self.scorer.weight = self.weight_oi  # the delta form replaces it in forward

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


class ExpertMatrix(NamedTuple):
    """One expert's (out, in) matrix of a 3-D expert parameter, as SubnetLinear takes it: a view."""

    weight: torch.Tensor
    bias: None = None


# transformers' expert layout the loop below reproduces (`use_experts_implementation`'s defaults).
EXPERT_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                 "has_post_expert_norm": False}


def expert_layout_why(experts: nn.Module) -> str | None:
    """Why `SubnetExperts` cannot stand for this experts module (another layout), or None."""
    params = {name for name, p in experts.named_parameters(recurse=False) if p.dim() == 3}
    other = {key: getattr(experts, key) for key, value in EXPERT_LAYOUT.items()
             if getattr(experts, key, value) != value}
    if params != {"gate_up_proj", "down_proj"} or other or not hasattr(experts, "act_fn"):
        return (f"{type(experts).__name__} is not the gate_up_proj/down_proj expert layout of Mixtral and "
                f"Qwen3-MoE{' (' + str(other) + ')' if other else ''}")
    return None


class SubnetExperts(nn.Module):
    """An experts module (Mixtral / Qwen3-MoE: 3-D gate_up_proj and down_proj) whose targeted parameters
    train a block per expert (`subnets[param][e]`). The 3-D parameters stay registered under their own
    names, so the state dict keeps the model's keys plus each expert's sub, rows and cols.

    The forward is transformers' eager experts loop (modeling_mixtral.MixtralExperts.forward) with each
    expert's matmul going through its SubnetLinear; whatever `config.experts_implementation` says, the
    loop is what lets an idle expert stay out of the graph.
    """

    def __init__(self, base: nn.Module, subnets: dict[str, list[SubnetLinear]]):
        super().__init__()
        self.num_experts = base.num_experts
        self.act_fn = base.act_fn
        self.gate_up_proj = base.gate_up_proj
        self.down_proj = base.down_proj
        self.subnets = nn.ModuleDict({name: nn.ModuleList(layers) for name, layers in subnets.items()})
        self.base = [base]  # the module `to_plain` gives back (a list: not a submodule, no duplicate keys)

    def _linear(self, param: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        if param in self.subnets:
            return self.subnets[param][expert](x)
        return F.linear(x, getattr(self, param)[expert])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in expert_hit.flatten().tolist():
            if expert == self.num_experts:  # the slot of tokens routed nowhere (expert parallelism)
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert])
            gate, up = self._linear("gate_up_proj", expert, hidden_states[token_idx]).chunk(2, dim=-1)
            current = self._linear("down_proj", expert, self.act_fn(gate) * up)
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states

    def to_plain(self) -> nn.Module:
        """The original experts module; its 3-D parameters are these (they hold the trained blocks)."""
        return self.base[0]


def _store_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` into the sharded DTensor `param` (no communication)."""
    shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.to_local().copy_(shard.to_local())
