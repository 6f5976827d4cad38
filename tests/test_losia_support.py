"""Shared helpers of the LoSiA tests (tiny in-code models, a minimal training loop). No tests here."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma3TextConfig,
    Gemma3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from losia_cli.engine.step import StepDriver, build_optimizer
from losia_cli.methods.base import Records, TrainContext, WarmupCosine
from losia_cli.methods.losia import LosiaConfig, LosiaMethod

VOCAB = 64

# The bound for two fp64 runs that do the same arithmetic in a different order (Pro's block GEMM against the
# dense gradient sliced, a tied head's two gradient paths summed in another order, the reference's loop).
# Each sum rounds at ~1e-16 relative; AdamW turns a relative gradient error d into a weight error of about
# lr * d per step, so 50 steps at lr 1e-2 stay near 1e-14 (8.5e-15 is the largest seen, qwen2 with
# param_second, the same on every MKL branch and thread count). A real defect (a wrong block, moment reset,
# rewarm or a lost gradient path) moves some weight by at least ~lr * 1e-2 = 1e-4. The same comparisons in
# fp32 differ by up to 4e-5 and by how MKL blocks its GEMMs, which no fixed bound can hold on every CPU.
FP64_ATOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to use. With tiny tensors, intra-op threads only add start-up cost and
    suffer badly from a busy machine (a 15x slowdown seen on 2 shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gemma(layers: int = 2, seed: int = 0) -> Gemma3ForCausalLM:
    """Gemma shapes: multi-query attention (1 KV head), tied embeddings, q/k norms."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
        sliding_window=16,
    )
    return Gemma3ForCausalLM(config).eval()


def tiny_qwen2(layers: int = 2, seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2 shapes: q/k/v projections with biases."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_moe(family: str = "mixtral", layers: int = 2, seed: int = 0):
    """A mixture-of-experts model (Mixtral / Qwen3-MoE: 3-D expert parameters, transformers 5). Eight
    experts and one per token, so that in most steps some expert gets no token."""
    torch.manual_seed(seed)
    experts = {"mixtral": {"num_local_experts": 8}, "qwen3_moe": {"num_experts": 8, "moe_intermediate_size": 16}}
    config = AutoConfig.for_model(
        family, vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        num_experts_per_tok=1, **experts[family],
        experts_implementation="eager",  # transformers' own loop; its grouped_mm takes no fp64
    )
    return AutoModelForCausalLM.from_config(config).eval()


MODELS = {"llama": tiny_llama, "gemma": tiny_gemma, "qwen2": tiny_qwen2}


class ListRecords(Records):
    """Keeps the method's subnets records in a list."""

    def __init__(self, records: list):
        self.records = records

    def write(self, stream: str, record: dict) -> None:
        assert stream == "subnets"
        self.records.append(record)


def make_ctx(total_steps: int = 50, warmup: int = 5, seed: int = 1, records: list | None = None, **kw):
    sink = ListRecords(records) if records is not None else Records()
    schedule = WarmupCosine(total_steps, warmup, 0.1)
    return TrainContext(schedule=schedule, total_steps=total_steps, seed=seed, records=sink, **kw)


def build(
    model_fn=tiny_llama, total_steps: int = 50, records: list | None = None, ctx_kw: dict | None = None,
    dtype: torch.dtype | None = None, **cfg
):
    """(model, method) with the method prepared, the model cast to `dtype` if given; cfg goes to LosiaConfig
    (small T and p by default)."""
    cfg.setdefault("period", 3)
    cfg.setdefault("rank_factor", 0.25)
    method = LosiaMethod(LosiaConfig(**cfg))
    model = model_fn() if dtype is None else model_fn().to(dtype)
    model = method.prepare(model, make_ctx(total_steps, records=records, **(ctx_kw or {})))
    return model, method


def make_optimizer(method: LosiaMethod, lr: float = 1e-2, weight_decay: float = 0.01) -> torch.optim.AdamW:
    return build_optimizer(method, lr, weight_decay)


def batch(step: int, micro: int, seq: int = 16, size: int = 2) -> torch.Tensor:
    """Deterministic token ids per (step, micro-batch), so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(0, VOCAB, (size, seq), generator=generator)


def train_step(model, method, optimizer, step: int, grad_accum: int = 1) -> float:
    """One optimizer step through the engine's step driver; the mean token loss."""
    device = next(model.parameters()).device  # the GPU tests train on CUDA
    batches = [{"input_ids": batch(step, micro).to(device), "labels": batch(step, micro).to(device)}
               for micro in range(grad_accum)]
    targets = sum(b["labels"][:, 1:].numel() for b in batches)
    loss_sum, _ = StepDriver(model, method, optimizer).step(step, batches, 1 / targets)
    return float(loss_sum) / targets


def train(model, method, optimizer, steps: range, grad_accum: int = 1) -> None:
    for step in steps:
        train_step(model, method, optimizer, step, grad_accum)
