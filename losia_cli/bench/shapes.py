"""Model shapes for `losia bench`: random weights of a named shape (only the shape matters for speed
and memory), a dict of config kwargs (tests), or a local HF dir; and the random token batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from losia_cli.errors import BenchError
from losia_cli.models import DTYPES

_LLAMA = dict(hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=4096)
# Random-weight shapes (only the shape matters for speed and memory). The two small Llamas keep an
# 8k vocabulary so the output head stays a realistic share of the compute, as it is at 7B.
SHAPES: dict[str, tuple[str, dict]] = {
    "llama_h512_l4": ("llama", dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=8, vocab_size=8192, **_LLAMA)),
    "llama_h1024_l8": ("llama", dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8,
                                     num_attention_heads=16, num_key_value_heads=16, vocab_size=8192, **_LLAMA)),
    "llama2_7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, **_LLAMA)),
    "llama2_13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, **_LLAMA)),
    "gemma_2b": ("gemma", dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                               num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=256000,
                               hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192)),
    "smollm2_135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
                                   rms_norm_eps=1e-5, max_position_embeddings=8192)),
}


@dataclass
class Batch:
    """The random token batch every method trains on (labels = inputs: every token is a target)."""

    input_ids: torch.Tensor
    n_targets: int


def make_batch(spec: dict, vocab: int) -> Batch:
    gen = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=gen)
    return Batch(ids.to(spec["device"]), spec["batch"] * (spec["seq"] - 1))


def _config_cls(family: str):
    from transformers import GemmaConfig, LlamaConfig

    return {"llama": LlamaConfig, "gemma": GemmaConfig}[family]


def build_model(model: str | dict, device: str, dtype: str, seed: int, attention: str | None = None) -> nn.Module:
    """A shape name (random weights), a dict {"family", **config kwargs} (tests), or a local HF dir.
    `attention`: a registered attention implementation in place of sdpa (the meta cost model's)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if isinstance(model, dict):
        kwargs = dict(model)
        config = _config_cls(kwargs.pop("family", "llama"))(**kwargs)
    elif model in SHAPES:
        family, kwargs = SHAPES[model]
        config = _config_cls(family)(**kwargs)
    elif Path(model).expanduser().is_dir():
        return AutoModelForCausalLM.from_pretrained(
            Path(model).expanduser(), dtype=DTYPES[dtype], attn_implementation=attention or "sdpa"
        ).to(device)
    else:
        raise _unknown(model)
    with torch.device(device):  # initialise directly on the device (a 7B init on CPU takes minutes)
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], attn_implementation=attention or "sdpa")


def vocab_size(model) -> int:
    if isinstance(model, dict):
        return model["vocab_size"]
    if model in SHAPES:
        return SHAPES[model][1]["vocab_size"]
    if not Path(model).expanduser().is_dir():
        raise _unknown(model)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(model).expanduser())
    return getattr(config, "vocab_size", None) or config.get_text_config().vocab_size




def _unknown(model) -> BenchError:
    return BenchError(f"unknown model '{model}': a local HF dir or one of {', '.join(SHAPES)}")
