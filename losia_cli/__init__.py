"""losia: fine-tune LLMs with LoSiA / LoSiA-Pro from YAML recipes."""

__version__ = "0.1.0"
