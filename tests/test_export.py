"""`losia export --format gguf`: tensors and tokenizer through the gguf package, read back by transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from losia_cli.cli import main
from losia_cli.export import load_gguf, round_like_gguf_
from losia_cli.merge import probe_tokens

TEXT = "Hello world, how are you? <|im_start|>user\nfine<|im_end|>"


@pytest.fixture(scope="module")
def bpe_llama_dir(tmp_path_factory):
    """A 2-layer Llama with a 300-token byte-level BPE trained here (a 49k vocabulary makes
    transformers' GGUF reader take tens of seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    backend.train_from_iterator([TEXT, "the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bpe-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _check_round_trip(source_dir, out, outtype):
    """The file's logits equal the source's with the file's rounding applied; its tokenizer is the source's."""
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    tokens = probe_tokens(source)
    with torch.no_grad():
        reloaded = load_gguf(out)(tokens).logits
        drift = (reloaded - source(tokens).logits).abs().max().item()
        assert torch.equal(reloaded, round_like_gguf_(source, outtype)(tokens).logits)
    gguf_tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert gguf_tokenizer(TEXT)["input_ids"] == AutoTokenizer.from_pretrained(source_dir)(TEXT)["input_ids"]
    return drift


@pytest.mark.parametrize("outtype, tolerance", [("f16", 1e-2), ("q8_0", 5e-2)])
def test_tiny_llama_round_trip(capsys, bpe_llama_dir, tmp_path, outtype, tolerance):
    out = tmp_path / f"tiny-{outtype}.gguf"
    assert main(["export", str(bpe_llama_dir), "--format", "gguf", "--outtype", outtype, "--out", str(out)]) == 0
    assert _check_round_trip(bpe_llama_dir, out, outtype) < tolerance
    card = (tmp_path / f"tiny-{outtype}.README.md").read_text()
    assert card.startswith("---\n") and "library_name: gguf" in card and f"GGUF {outtype}" in card
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, f"tiny-{outtype}.README.md"])
    # An existing file is kept unless --force.
    assert main(["export", str(bpe_llama_dir), "--format", "gguf", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_unsupported_architecture_is_refused(capsys, tok, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(source)
    tok.save_pretrained(source)
    out = tmp_path / "x.gguf"
    assert main(["export", str(source), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Llama-family" in err and "gpt2" in err and "Traceback" not in err
    assert not out.exists() and not any(p.name.startswith(".x") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_smollm2_round_trip(smollm2_dir, tmp_path):
    out = tmp_path / "smollm2-f16.gguf"
    assert main(["export", str(smollm2_dir), "--format", "gguf", "--out", str(out)]) == 0
    assert _check_round_trip(smollm2_dir, out, "f16") < 0.1
