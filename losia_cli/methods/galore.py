"""GaLore through `galore-torch`: gradient low-rank projection inside the optimizer, nothing by hand.

Every parameter trains. The 2-D weights of the target projections form one param group carrying
GaLore's keys (`rank`, `update_proj_gap`, `scale`, `proj_type`); `galore_torch.GaLoreAdamW` projects
their gradients to rank r, keeps its Adam moments in that space and projects the update back. All
other parameters are a plain dense group of the same optimizer.

`Method.make_optimizer` builds plain AdamW, which would ignore the GaLore keys and silently run full
fine-tuning, hence the override.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from losia_cli.errors import ConfigError
from losia_cli.methods.base import Method, TrainContext, check, method_config
from losia_cli.methods.targets import account, candidates, default_linears, matches


_FLATTENS = "dist={dist} flattens parameters, and GaLore projects 2-D gradients; use dist=ddp"


@method_config
class GaloreConfig:
    name: Literal["galore"] = "galore"
    rank: int = 128
    """Rank of the gradient projection."""
    update_proj_gap: int = 200
    """Steps between SVDs of the gradient (projector refresh)."""
    scale: float = 0.25
    """The projected-back update is multiplied by this (GaLore's alpha)."""
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "std"
    """Which side(s) of the gradient GaLore projects."""
    target_modules: list[str] | None = None
    """Linears trained with projected gradients (names or dotted suffixes); the rest train densely.
    null: every linear map inside the decoder blocks (not MoE routers, experts or the output head)."""

    def __post_init__(self):
        check(self.rank > 0, "rank", "must be > 0", self.rank)
        check(self.update_proj_gap > 0, "update_proj_gap", "must be > 0", self.update_proj_gap)


class GaloreMethod(Method):
    name = "galore"
    names = ("galore",)
    config_class = GaloreConfig
    unsupported_dist = {dist: _FLATTENS for dist in ("fsdp", "zero2", "zero3")}
    requires = ("galore_torch", "galore-torch")

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        model.requires_grad_(True)
        super().prepare(model, ctx)
        targets = self.cfg.target_modules
        self.projected = set(default_linears(model)) if targets is None else {
            name for name, _ in model.named_modules() if matches(name, targets)
        }
        if not self.galore_params():
            raise ConfigError(f"galore: no 2-D weight matches target_modules={self.cfg.target_modules}")
        return model

    def projected_modules(self) -> dict[str, nn.Module]:
        """The target modules with a 2-D weight, by name."""
        return {
            name: module
            for name, module in self.model.named_modules()
            if name in self.projected and getattr(module, "weight", None) is not None and module.weight.dim() == 2
        }

    def galore_params(self) -> list[nn.Parameter]:
        return [module.weight for module in self.projected_modules().values()]

    def target_account(self) -> dict:
        """The projected matrices; nothing is left out: every other parameter (embeddings, norms, the
        head, 3-D expert parameters) trains densely."""
        info = account(candidates(self.model), {name: m.weight.numel() for name, m in self.projected_modules().items()})
        dense = sum(p.numel() for p in self.model.parameters()) - info["params"]
        info.update(left_out=[], note=f"projected; every other parameter trains densely ({dense:,})")
        return info

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        projected = self.galore_params()
        ids = {id(p) for p in projected}
        dense = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        cfg = self.cfg
        groups = [
            {
                "params": projected, "lr": lr, "weight_decay": weight_decay, "name": "galore",
                "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap, "scale": cfg.scale,
                "proj_type": cfg.proj_type,
            }
        ]
        if dense:
            groups.append({"params": dense, "lr": lr, "weight_decay": weight_decay, "name": "dense"})
        return groups

    @classmethod
    def sized_config(cls, name: str, rank: int, **options):
        return cls.config_class(rank=rank)

    def make_optimizer(self, groups: list[dict], lr: float, betas, eps: float) -> torch.optim.Optimizer:
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(groups, lr=lr, betas=tuple(betas), eps=eps, no_deprecation_warning=True)

    def describe(self) -> dict:
        """Adam moments live in the projected space (r x the longer side) plus the r x shorter-side projector."""
        info = super().describe()
        projected = self.galore_params()
        ids = {id(p) for p in projected}
        dense = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        state = sum(2 * p.numel() * p.element_size() for p in dense)
        for p in projected:
            m, n = p.shape
            r = min(self.cfg.rank, m, n)
            state += (2 * max(m, n) * r + min(m, n) * r) * p.element_size()
        info["optimizer_state_bytes"] = state
        return info
