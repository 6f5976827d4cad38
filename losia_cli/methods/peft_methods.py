"""LoRA, DoRA and PiSSA through `peft`: configuration only, no re-implementation."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import field
from typing import Literal

from torch import nn

from losia_cli.errors import ConfigError
from losia_cli.methods.base import LLAMA_PROJECTIONS, Method, TrainContext, method_config


@method_config
class PeftMethodConfig:
    name: Literal["lora", "dora", "pissa"]
    rank: int = 8
    """Adapter rank r."""
    alpha: float | None = None
    """Adapter scale numerator (update scaled by alpha / r); null: 2 * rank, the common choice."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    """As peft: module names, a regex, or "all-linear"."""
    pissa_niter: int | None = 16
    """Fast SVD iterations for PiSSA init; null = exact SVD."""
    adapter_dtype: Literal["fp32", "base"] = "fp32"
    """fp32: peft's default, adapters upcast to fp32 under a bf16/fp16 base (more activation memory and
    traffic); base: adapters in the base weights' dtype (`lora_bf16` in bench, the fair baseline)."""


class PeftMethod(Method):
    """The model becomes a PeftModel; `final/` holds the adapter, `losia merge` folds it."""

    names = ("lora", "dora")
    config_class = PeftMethodConfig
    export_kind = "adapter"

    def __init__(self, cfg: PeftMethodConfig):
        super().__init__(cfg)
        self.name = cfg.name

    @classmethod
    def sized_config(cls, name: str, rank: int, **options):
        return cls.config_class(name=name, rank=rank)

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
        from peft.utils.error import NoMatchingPeftModuleError

        try:
            model = get_peft_model(
                model, self.peft_config(), autocast_adapter_dtype=self.cfg.adapter_dtype == "fp32"
            )
        except NoMatchingPeftModuleError:
            raise ConfigError(f"no module matched method.target_modules={self.cfg.target_modules!r}") from None
        if self.cfg.name == "pissa":
            # PiSSA replaces the base weights by the residual W - BA. To ship an adapter for the
            # original base, keep the initial adapter; peft converts the trained one against it.
            self.pissa_init = tempfile.mkdtemp(prefix="losia-pissa-init-")
            config = model.peft_config["default"]
            init, config.init_lora_weights = config.init_lora_weights, True
            model.save_pretrained(self.pissa_init)
            config.init_lora_weights = init
        return super().prepare(model, ctx)

    def save(self, exported: nn.Module, path, state_dict: dict | None = None) -> None:
        if self.cfg.name != "pissa":
            return super().save(exported, path, state_dict)
        exported.save_pretrained(path, path_initial_model_for_weight_conversion=self.pissa_init)
        shutil.rmtree(self.pissa_init, ignore_errors=True)


class PissaMethod(PeftMethod):
    """PiSSA: LoRA initialised from the weights' principal singular vectors (peft's `pissa` init)."""

    names = ("pissa",)
    unsupported_dist = {
        "fsdp": "dist={dist}: PiSSA's export converts the live (sharded) adapter; use dist=ddp or zero2",
        "zero3": "dist={dist}: PiSSA's export converts the live (sharded) adapter; use dist=ddp or zero2",
    }
