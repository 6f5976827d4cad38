"""Method registry: `method.name` in a recipe -> the class that implements it."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from losia_cli.methods.base import Method, TrainContext, WarmupCosine
from losia_cli.methods.full import FullConfig, FullMethod
from losia_cli.methods.galore import GaloreConfig, GaloreMethod
from losia_cli.methods.losia import LosiaConfig, LosiaMethod
from losia_cli.methods.peft_methods import PeftMethod, PeftMethodConfig

MethodConfig = Annotated[
    Union[FullConfig, PeftMethodConfig, GaloreConfig, LosiaConfig], Field(discriminator="name")
]

_METHODS = {
    "full": FullMethod,
    "lora": PeftMethod,
    "dora": PeftMethod,
    "pissa": PeftMethod,
    "galore": GaloreMethod,
    "losia": LosiaMethod,
    "losia_pro": LosiaMethod,
}


def build_method(cfg) -> Method:
    return _METHODS[cfg.name](cfg)


__all__ = ["Method", "MethodConfig", "TrainContext", "WarmupCosine", "build_method"]
