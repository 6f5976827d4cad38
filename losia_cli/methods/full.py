"""Full fine-tuning: every parameter trains with AdamW. The upper bound LoSiA is measured against."""

from __future__ import annotations

from typing import Literal

from torch import nn

from losia_cli.methods.base import Method, TrainContext, method_config


@method_config
class FullConfig:
    name: Literal["full"] = "full"


class FullMethod(Method):
    name = "full"
    names = ("full",)
    config_class = FullConfig

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        model.requires_grad_(True)
        return super().prepare(model, ctx)
