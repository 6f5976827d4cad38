"""LoSiA / LoSiA-Pro: subnet layer + autograd, importance, localization, schedule."""

from .config import LosiaConfig
from .method import LosiaMethod

__all__ = ["LosiaConfig", "LosiaMethod"]
