"""Fine-tuning methods. Each registers once here (see README, "Add a method")."""

from __future__ import annotations

from losia_cli.methods.base import Distributed, Method, Records, TrainContext, WarmupCosine
from losia_cli.methods.full import FullMethod
from losia_cli.methods.galore import GaloreMethod
from losia_cli.methods.losia import LosiaMethod
from losia_cli.methods.peft_methods import PeftMethod, PissaMethod
from losia_cli.methods.registry import (
    build_method, config_classes, exports_adapter, method_class, method_names, register,
)

register(FullMethod)
register(PeftMethod)
register(PissaMethod)
register(GaloreMethod)
register(LosiaMethod)

__all__ = [
    "Distributed", "Method", "Records", "TrainContext", "WarmupCosine", "build_method",
    "config_classes", "exports_adapter", "method_class", "method_names", "register",
]
