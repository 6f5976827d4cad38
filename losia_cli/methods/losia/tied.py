"""A subnet-trained output head tied to the input embedding (Gemma, SmolLM2, ...; docs/method.md 3.1, 3.6).

The head's W is also the embedding table, so its true gradient is the head path's plus the embedding
path's. The head wrapper sees only the first; this forward hook on the embedding adds the second: to
`sub` for the token ids that are rows of the block, and, while the head scores, in full to the scorer.
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import SubnetLinear


def route_tied_embedding(embedding: nn.Module, head: SubnetLinear):
    """Hook `embedding` (whose weight is `head.weight`) so the lookup reaches `head.sub`; returns the
    hook handle."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        training = torch.is_grad_enabled() and head.sub.requires_grad
        if not (training or head.delta):
            return None  # write-through: the table already holds the trained block
        ids, weight = args[0], module.weight
        # HF's scaled embeddings (Gemma) multiply the looked-up rows by embed_scale.
        scale = getattr(module, "embed_scale", torch.ones((), device=weight.device)).to(weight.dtype)
        pos = torch.searchsorted(head.rows, ids).clamp_(max=head.rows.numel() - 1)  # rows are sorted
        in_block = head.rows[pos] == ids
        # The padding row gets no gradient from the lookup (its value still counts).
        looked_up = ids != (-1 if module.padding_idx is None else module.padding_idx)
        block_rows = head.sub[pos]
        block_rows = torch.where(looked_up[..., None], block_rows, block_rows.detach())
        # Zero in value under write-through (W[R] == sub); the trained block's offset in delta form.
        offset = block_rows.to(weight.dtype) - weight.detach()[ids]
        output = output + torch.where(in_block[..., None], offset * scale, 0)
        if training and head.scorer is not None:
            grad_acc, rows = head.scorer.grad_acc, ids[looked_up]

            def add_to_score(grad: torch.Tensor) -> None:
                grad_acc.index_add_(0, rows, (grad * scale)[looked_up].to(grad_acc.dtype))

            output.register_hook(add_to_score)
        return output

    return embedding.register_forward_hook(hook)
