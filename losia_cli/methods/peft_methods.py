"""LoRA, DoRA and PiSSA through `peft`: configuration only, no re-implementation."""

from __future__ import annotations

import shutil
import tempfile
from typing import Literal

from torch import nn

from losia_cli.errors import ConfigError
from losia_cli.methods.base import Method, TrainContext, method_config
from losia_cli.methods.targets import (
    account, candidates, default_linears, expert_params, matches, named_experts,
)


@method_config
class PeftMethodConfig:
    name: Literal["lora", "dora", "pissa"]
    rank: int = 8
    """Adapter rank r."""
    alpha: float | None = None
    """Adapter scale numerator (update scaled by alpha / r); null: 2 * rank, the common choice."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] | str | None = None
    """As peft: module names, a regex, or "all-linear". null: every linear map inside the decoder blocks
    (not MoE routers or the output head), and LoRA also adapts the 3-D expert parameters of a
    mixture-of-experts block (peft's `target_parameters`)."""
    target_parameters: list[str] | None = None
    """3-D parameters LoRA adapts, as peft (names or dotted suffixes, e.g. experts.gate_up_proj). null: every
    mixture-of-experts expert parameter when target_modules is null, none when it names modules."""
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

    def experts_why(self) -> str | None:
        """Why this configuration cannot adapt 3-D expert parameters (peft's ParamWrapper), or None."""
        if self.cfg.name != "lora":
            return f"MoE expert weights (3-D): losia adapts them with method=lora only, not {self.cfg.name}"
        if self.cfg.dropout:
            return "MoE expert weights (3-D): peft adapts them only with method.dropout=0"
        return None

    def targets(self, model: nn.Module) -> tuple[list[str] | str, list[str] | None]:
        """(peft's target_modules, target_parameters). The default names the linear maps of the decoder
        blocks by their short names when those pick exactly the same modules (a readable adapter
        config), else by their full names."""
        why = self.experts_why()
        if self.cfg.target_parameters and why:
            raise ConfigError(f"method.target_parameters: {why}")
        if named := named_experts(candidates(model), self.cfg.target_modules):
            raise ConfigError(f"method.target_modules names {named}: MoE expert weights (3-D) are not modules; "
                              "method=lora adapts them through method.target_parameters")
        if self.cfg.target_modules is not None:
            modules, experts = self.cfg.target_modules, []
        else:
            modules = default_linears(model)
            if not modules:
                raise ConfigError("no linear map found in the model's decoder blocks: name the targets in "
                                  "method.target_modules")
            short = sorted({name.rsplit(".", 1)[-1] for name in modules})
            if {name for name, _ in model.named_modules() if matches(name, short)} == set(modules):
                modules = short
            experts = [] if why else expert_params(model)
        params = self.cfg.target_parameters if self.cfg.target_parameters is not None else experts
        return modules, params or None

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig

        cfg = self.cfg
        target_modules, target_parameters = self.targets(model)
        return LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.rank,
            lora_dropout=cfg.dropout,
            target_modules=target_modules,
            target_parameters=target_parameters,
            use_dora=cfg.name == "dora",
            init_lora_weights=self.init_lora_weights(),
            task_type="CAUSAL_LM",
        )

    def init_lora_weights(self) -> bool | str:
        """peft's `init_lora_weights`: True is LoRA's own (B = 0)."""
        return True

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        from peft import get_peft_model
        from peft.utils.error import NoMatchingPeftModuleError

        self.candidates = candidates(model)
        config = self.peft_config(model)
        try:
            model = get_peft_model(model, config, autocast_adapter_dtype=self.cfg.adapter_dtype == "fp32")
        except NoMatchingPeftModuleError:
            raise ConfigError(f"no module matched method.target_modules={self.cfg.target_modules!r}") from None
        except ValueError as e:  # peft refuses a module it cannot adapt
            raise ConfigError(f"method.target_modules={self.cfg.target_modules!r}: {str(e).splitlines()[0]}") from None
        if self.cfg.target_parameters and not any(
            getattr(module, "parameter_name", None) for module in model.modules()
        ):  # peft only warns
            raise ConfigError(f"method.target_parameters={self.cfg.target_parameters!r} matched no parameter")
        return super().prepare(model, ctx)

    def target_account(self) -> dict:
        """The modules and parameters peft wrapped, with their adapter parameters."""
        from peft.tuners.lora import LoraLayer

        trained, names = {}, {c.name for c in self.candidates}
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                # Two parameters of one module (experts' gate_up_proj and down_proj) nest one ParamWrapper
                # in the other: each wrapper's own adapter is what is not under its base_layer.
                base = name.removeprefix("base_model.model.").replace(".base_layer", "")
                param = getattr(module, "parameter_name", None)
                # A 3-D parameter is its own candidate; a 2-D one (a router's weight) stands for its module.
                trained[f"{base}.{param}" if f"{base}.{param}" in names else base] = sum(
                    p.numel() for n, p in module.named_parameters() if "lora_" in n and not n.startswith("base_layer.")
                )
        why = self.experts_why() or "MoE expert weights, not in method.target_parameters"
        return account(self.candidates, trained, {"experts": why})



class PissaMethod(PeftMethod):
    """PiSSA: LoRA initialised from the weights' principal singular vectors (peft's `pissa` init).

    PiSSA replaces the base weights by the residual W - BA. To ship an adapter for the original base,
    prepare() keeps the initial adapter and save() has peft convert the trained one against it."""

    names = ("pissa",)
    unsupported_dist = {
        "fsdp": "dist={dist}: PiSSA's export converts the live (sharded) adapter; use dist=ddp or zero2",
        "zero3": "dist={dist}: PiSSA's export converts the live (sharded) adapter; use dist=ddp or zero2",
    }

    def init_lora_weights(self) -> str:
        return "pissa" if self.cfg.pissa_niter is None else f"pissa_niter_{self.cfg.pissa_niter}"

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        model = super().prepare(model, ctx)
        self.pissa_init = tempfile.mkdtemp(prefix="losia-pissa-init-")
        config = model.peft_config["default"]
        init, config.init_lora_weights = config.init_lora_weights, True
        model.save_pretrained(self.pissa_init)
        config.init_lora_weights = init
        return model

    def save(self, exported: nn.Module, path, state_dict: dict | None = None) -> None:
        exported.save_pretrained(path, path_initial_model_for_weight_conversion=self.pissa_init)
        shutil.rmtree(self.pissa_init, ignore_errors=True)
