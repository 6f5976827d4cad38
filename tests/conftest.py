"""Shared fixtures: everything offline, CPU, tiny models built in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Under `make test`'s two xdist workers, one thread per process (and per CLI process a test launches):
# two workers at two threads each would oversubscribe two cores. No result depends on it (the float
# comparisons are exact or fp64, see NUMERIC); CI's reruns set OMP_NUM_THREADS themselves.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

REPO = Path(__file__).resolve().parents[1]

# Offline always; the converted SmolLM2 dir is cached across test sessions (keyed, so never stale).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LOSIA_CACHE", str(REPO / ".pytest_cache" / "losia"))
torch.set_num_threads(min(2, torch.get_num_threads()))

# Modules that compare floats reached by different paths (Pro against the dense form or the reference,
# resumed against straight, sharded against one process, merged against trained). CI reruns them under
# other MKL kernel branches and thread counts (.ci/run), so a bound that holds on one CPU only fails there.
NUMERIC = {
    "test_losia_equivalence", "test_losia_reference", "test_losia_autograd", "test_losia_selection",
    "test_losia_resume", "test_step", "test_data_packing", "test_peft_methods", "test_eval_model",
    "test_scorer_fused", "test_merge", "test_lm_eval", "test_engine", "test_distributed",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__ in NUMERIC:
            item.add_marker(pytest.mark.numeric)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a plain HF dir (converted from the packaged GGUF once)."""
    from losia_cli.config import ModelConfig
    from losia_cli.models import resolve_model_path

    return Path(resolve_model_path(ModelConfig(name_or_path="package:smollm2-135m")))


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and SmolLM2's real tokenizer, saved as an HF dir."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny_config(tiny_llama_dir, tmp_path):
    """Build a validated RunConfig for a short run of the tiny Llama on the bundled math samples."""
    from losia_cli.compose import load_config

    def make(name: str, *overrides: str):
        return load_config([
            f"model.name_or_path={tiny_llama_dir}", "data.max_length=64", "train.micro_batch_size=4",
            "train.max_steps=4", "train.warmup_ratio=0", f"run.output_dir={tmp_path}", f"run.name={name}",
            *overrides,
        ])

    return make


@pytest.fixture(scope="session")
def tok(smollm2_dir):
    """The real SmolLM2 tokenizer (eos <|im_end|>, pad == eos)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
