"""LoRA, DoRA and PiSSA through `peft`: configuration only, no re-implementation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict
from torch import nn

from losia_cli.methods.base import Method, TrainContext

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PeftMethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["lora", "dora", "pissa"]
    rank: int = 8
    alpha: float | None = None  # None: 2 * rank, the common choice
    dropout: float = 0.0
    target_modules: list[str] | str = LLAMA_PROJECTIONS  # as peft: names, a regex, or "all-linear"
    pissa_niter: int | None = 16  # fast SVD iterations for PiSSA init; None = exact SVD


class PeftMethod(Method):
    """The model becomes a PeftModel; `final/` holds the adapter, `losia merge` folds it."""

    def __init__(self, cfg: PeftMethodConfig):
        super().__init__(cfg)
        self.name = cfg.name

    def peft_config(self):
        from peft import LoraConfig

        cfg = self.cfg
        init = True
        if cfg.name == "pissa":
            init = "pissa" if cfg.pissa_niter is None else f"pissa_niter_{cfg.pissa_niter}"
        return LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.rank,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_dora=cfg.name == "dora",
            init_lora_weights=init,
            task_type="CAUSAL_LM",
        )

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        from peft import get_peft_model

        return super().prepare(get_peft_model(model, self.peft_config()), ctx)
