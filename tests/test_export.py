"""`losia export --format gguf`: tensors and tokenizer through the gguf package, read back by transformers
(Llama) or by gguf's own reader (Gemma, which transformers cannot load from GGUF)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from losia_cli.cli import main
from losia_cli.export import ARCHITECTURES, SPLIT_PRE_TOKENIZERS, llama_cpp_names, load_gguf, round_like_gguf_
from losia_cli.merge import probe_tokens

TEXT = "Hello world, how are you? <|im_start|>user\nfine<|im_end|>"


def _bpe_tokenizer(split: str = "gpt-2"):
    """A 300-token byte-level BPE trained here (a 49k vocabulary makes transformers' GGUF reader take
    tens of seconds), with GPT-2's split, SmolLM's (digits first) or a Split regex as Llama-3 / Qwen2
    write it (SPLIT_PRE_TOKENIZERS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in ("gpt-2", "smollm"))
    if split == "gpt-2":
        backend.pre_tokenizer = byte_level
    elif split == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        regex = next(regex for regex, name in SPLIT_PRE_TOKENIZERS.items() if name == split)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    backend.train_from_iterator([TEXT, "the quick brown fox jumps over the lazy dog 12345"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def _tiny_model(family: str, vocab_size: int, **overrides):
    """A 2-layer random model of a transformers family, small enough to export in a second."""
    import transformers

    config_class, model_class = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }[family]
    options = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   tie_word_embeddings=True)
    if family == "qwen3":
        options["head_dim"] = 32  # wider than hidden / heads, as Qwen3's are: key_length must say so
    options.update(overrides)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**options))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # initialised to 0, which would hide a bias in the wrong layout
                param.uniform_(-0.5, 0.5)
    return model


@pytest.fixture(scope="module")
def bpe_llama_dir(tmp_path_factory):
    """A 2-layer Llama with a tiny byte-level BPE (GPT-2's split)."""
    tokenizer = _bpe_tokenizer()
    out = tmp_path_factory.mktemp("bpe-llama")
    _tiny_model("llama", len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# Trains the tiny sentencepiece vocabularies below; the test text adds bytes none of it has ("日本", "~").
SPM_LINES = ["Hello world, how are you?", "the quick brown fox jumps over the lazy dog",
             "<start_of_turn>user\nfine, thanks<end_of_turn>", "numbers 12 and 345 and   three spaces"]
SPM_TEXT = "Hello  world, how are you? The fox jumps 42 times ~ 日本 <start_of_turn>user\nfine<end_of_turn>"


def _train_sentencepiece(path, **options):
    """A byte-fallback BPE sentencepiece model at `path`/tokenizer.model: 256 byte pieces, the
    specials, the characters and some 100 merges."""
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_LINES * 20), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, **options)
    (path / "tokenizer.model").write_bytes(model.getvalue())


@pytest.fixture(scope="module")
def spm_llama_dir(tmp_path_factory):
    """A 2-layer Llama-2-shaped model (untied output) with a sentencepiece tokenizer: tokenizer.model
    beside the tokenizer.json transformers writes, as in a Llama-2 download."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    out = tmp_path_factory.mktemp("spm-llama")
    _train_sentencepiece(out, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    tokenizer = LlamaTokenizer.from_pretrained(out, add_bos_token=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A 2-layer Gemma (one KV head, head_dim != hidden/heads) with Gemma's sentencepiece layout and
    random norm weights (Gemma initialises them to 0, which would hide a missing +1)."""
    from transformers import GemmaConfig, GemmaForCausalLM, GemmaTokenizer

    out = tmp_path_factory.mktemp("gemma")
    _train_sentencepiece(out, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                         bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
                         user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
                         remove_extra_whitespaces=False, normalization_rule_name="identity")
    tokenizer = GemmaTokenizer.from_pretrained(out, add_bos_token=True)
    config = GemmaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=128)
    torch.manual_seed(0)
    model = GemmaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _field(reader, key):
    """A GGUF metadata value: a scalar, a string, or a list for arrays."""
    field = reader.get_field(key)
    values = [field.parts[i] for i in field.data]
    if field.types[0] == 9:  # an array
        return [bytes(v).decode() if field.types[-1] == 8 else v.item() for v in values]
    return bytes(values[0]).decode() if field.types[0] == 8 else values[0].item()


def _check_spm_vocab(reader, model_file, source):
    """Tokens, scores and types are sentencepiece's own (scores: in the same order when they were
    rebuilt from tokenizer.json), added tokens are control / user-defined; special ids and flags."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = (_field(reader, f"tokenizer.ggml.{key}") for key in ("tokens", "scores", "token_type"))
    assert _field(reader, "tokenizer.ggml.model") == "llama" and len(tokens) == sp.vocab_size()
    T = gguf.TokenType
    for i in range(sp.vocab_size()):
        added = source.added_tokens_decoder.get(i)
        if sp.IsUnknown(i) or sp.IsControl(i) or sp.IsByte(i):
            expected = T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else T.BYTE
        else:
            expected = T.NORMAL if added is None else T.CONTROL if added.special else T.USER_DEFINED
        assert (tokens[i], types[i]) == (sp.IdToPiece(i), expected), i
    normal = [i for i in range(sp.vocab_size()) if types[i] == T.NORMAL]  # ranked alike, ties included
    rank = lambda values: np.unique(values, return_inverse=True)[1].tolist()  # noqa: E731
    assert rank([scores[i] for i in normal]) == rank([sp.GetScore(i) for i in normal])
    for key, value in (("bos_token_id", source.bos_token_id), ("eos_token_id", source.eos_token_id),
                       ("unknown_token_id", source.unk_token_id), ("add_bos_token", True)):
        assert _field(reader, f"tokenizer.ggml.{key}") == value, key
    return scores, sp


@pytest.mark.parametrize("vocab_from", ["tokenizer.model", "tokenizer.json"])
def test_sentencepiece_llama_round_trip(spm_llama_dir, tmp_path, vocab_from):
    """Llama-2's case: the vocabulary from tokenizer.model, or from tokenizer.json alone (a run's final/)."""
    import gguf

    source = tmp_path / "source"
    shutil.copytree(spm_llama_dir, source)
    model_file = source / "tokenizer.model"
    if vocab_from == "tokenizer.json":  # moved away: transformers would find it beside the file too
        (tmp_path / "kept").mkdir()
        model_file = shutil.move(model_file, tmp_path / "kept")
    out = tmp_path / "llama2.gguf"
    assert main(["export", str(source), "--format", "gguf", "--out", str(out)]) == 0
    _check_round_trip(source, out, "f16", SPM_TEXT)
    reader = gguf.GGUFReader(out)
    source_tokenizer = AutoTokenizer.from_pretrained(source)
    scores, sp = _check_spm_vocab(reader, model_file, source_tokenizer)
    if vocab_from == "tokenizer.model":  # sentencepiece's own, but -1000 for added tokens as llama.cpp writes
        added = source_tokenizer.added_tokens_decoder
        assert scores == [-1000.0 if i in added and not sp.IsUnknown(i) else sp.GetScore(i)
                          for i in range(sp.vocab_size())]
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is True
    assert "output.weight" in {tensor.name for tensor in reader.tensors}  # untied, as Llama-2


def test_stale_tokenizer_model_is_ignored(spm_llama_dir, gemma_dir, tmp_path):
    """A tokenizer.model holding another vocabulary is passed over for the tokenizer's own (tokenizer.json)."""
    import gguf

    source = tmp_path / "source"
    shutil.copytree(spm_llama_dir, source)
    shutil.copy(gemma_dir / "tokenizer.model", source / "tokenizer.model")
    out = tmp_path / "x.gguf"
    assert main(["export", str(source), "--format", "gguf", "--out", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(spm_llama_dir)
    tokens = _field(gguf.GGUFReader(out), "tokenizer.ggml.tokens")
    assert tokens[:260] == tokenizer.convert_ids_to_tokens(list(range(260)))  # specials, added, bytes


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_gemma_file_holds_the_rounded_model(gemma_dir, tmp_path, outtype):
    """Gemma: transformers 5.23 cannot load a `gemma` GGUF, so the file is read with gguf's reader and
    held to what llama.cpp's converter writes: norms +1 in F32, q/k rows as HF has them (NEOX rope),
    no output tensor, head width as key/value length; and transformers' GGUF tokenizer reads it back."""
    import gguf
    from transformers import GemmaTokenizer

    out = tmp_path / f"gemma-{outtype}.gguf"
    assert main(["export", str(gemma_dir), "--format", "gguf", "--outtype", outtype, "--out", str(out)]) == 0
    with pytest.raises(ValueError, match="architecture gemma is not supported"):
        load_gguf(out)  # when this starts to load, hold Gemma to the logits check instead
    source = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32)
    reader = gguf.GGUFReader(out)
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.data.shape[0], -1).squeeze()
              for t in reader.tensors}
    assert _field(reader, "general.architecture") == "gemma" and "output.weight" not in stored
    assert _field(reader, "gemma.attention.key_length") == _field(reader, "gemma.attention.value_length") == 32
    assert _field(reader, "gemma.attention.head_count_kv") == 1
    layers = source.model.layers
    for name, norm in (("output_norm", source.model.norm), ("blk.0.attn_norm", layers[0].input_layernorm),
                       ("blk.1.ffn_norm", layers[1].post_attention_layernorm)):
        assert np.array_equal(stored[f"{name}.weight"], (norm.weight.detach() + 1).numpy()), name
    round_like_gguf_(source, outtype)
    for name, weight in (("token_embd", source.model.embed_tokens.weight),
                         ("blk.0.attn_q", layers[0].self_attn.q_proj.weight),
                         ("blk.1.attn_k", layers[1].self_attn.k_proj.weight)):
        assert np.array_equal(stored[f"{name}.weight"], weight.detach().numpy()), name
    _check_spm_vocab(reader, gemma_dir / "tokenizer.model", AutoTokenizer.from_pretrained(gemma_dir))
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is False
    gguf_tokenizer = GemmaTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert gguf_tokenizer(SPM_TEXT)["input_ids"] == AutoTokenizer.from_pretrained(gemma_dir)(SPM_TEXT)["input_ids"]


def test_gemma_llama_cpp_cannot_run_is_refused(gemma_dir, tmp_path, capsys):
    """llama.cpp's gemma graph hard-codes tanh-GELU and the tied output; anything else is refused."""
    from transformers import GemmaForCausalLM

    source = tmp_path / "source"
    shutil.copytree(gemma_dir, source)
    model = GemmaForCausalLM.from_pretrained(source)
    model.config.hidden_act = "relu"
    model.save_pretrained(source)
    assert main(["export", str(source), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "Gemma needs hidden_act gelu_pytorch_tanh" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_gemma_file_that_differs_is_refused(gemma_dir, tmp_path, monkeypatch, capsys):
    """Without transformers to read it back, gguf's reader is what catches a wrong Gemma file."""
    from losia_cli import export

    def corrupted(model, outtype):
        for name, data, qtype in real(model, outtype):
            yield name, data * 2 if name == "blk.1.ffn_norm.weight" else data, qtype

    real = export._gguf_tensors
    monkeypatch.setattr(export, "_gguf_tensors", corrupted)
    assert main(["export", str(gemma_dir), "--format", "gguf", "--out", str(tmp_path / "bad.gguf")]) == 2
    assert "verification failed: blk.1.ffn_norm.weight differs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _check_round_trip(source_dir, out, outtype, text=TEXT):
    """The file's logits equal the source's with the file's rounding applied; its tokenizer is the source's."""
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    tokens = probe_tokens(source)
    with torch.no_grad():
        reloaded = load_gguf(out)(tokens).logits
        drift = (reloaded - source(tokens).logits).abs().max().item()
        assert torch.equal(reloaded, round_like_gguf_(source, outtype)(tokens).logits)
    gguf_tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert gguf_tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(source_dir)(text)["input_ids"]
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
    assert "cannot write architecture 'gpt2'" in err and "Traceback" not in err
    assert not out.exists() and not any(p.name.startswith(".x") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_smollm2_round_trip(smollm2_dir, tmp_path):
    out = tmp_path / "smollm2-f16.gguf"
    assert main(["export", str(smollm2_dir), "--format", "gguf", "--out", str(out)]) == 0
    assert _check_round_trip(smollm2_dir, out, "f16") < 0.1


def test_every_name_we_write_is_one_llama_cpp_accepts():
    """llama.cpp refuses a whole file over one name it does not know (it calls GPT-2's split `gpt-2`,
    not `gpt2`): every architecture, tokenizer model and pre-tokenizer the exporter can write is in the
    lists taken from llama.cpp's source (test_export_llamacpp.py confirms them by loading)."""
    from losia_cli import export

    names = llama_cpp_names()
    assert set(ARCHITECTURES.values()) <= set(names["architectures"])
    for split in ("gpt-2", "smollm", *SPLIT_PRE_TOKENIZERS.values()):
        assert export._pre_tokenizer(_bpe_tokenizer(split)) == split
        assert split in names["pre_tokenizers"], split
    assert {"gpt2", "llama"} <= set(names["tokenizer_models"]) and "default" in names["pre_tokenizers"]
    assert set(names["pre_tokenizer_hashes"].values()) <= set(names["pre_tokenizers"])
    assert "gpt2" not in names["pre_tokenizers"]  # the name the first exporter wrote


def test_split_regexes_are_the_ones_transformers_reads_back():
    """transformers' GGUF tokenizer rebuilds the split from `tokenizer.ggml.pre`: the same regex."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    for regex, name in SPLIT_PRE_TOKENIZERS.items():
        assert GGUF_PRE_TOKENIZER_SPLITS[name] == regex, name


def test_a_released_tokenizer_is_named_by_its_hash(monkeypatch):
    """As llama.cpp's converter does: the ids of its check text, hashed, name a known tokenizer before
    its split is looked at (here the tiny GPT-2-split vocabulary posing as a released one)."""
    import hashlib

    from losia_cli import export

    tokenizer = _bpe_tokenizer()
    names = dict(llama_cpp_names())
    digest = hashlib.sha256(str(tokenizer.encode(names["check_text"])).encode()).hexdigest()
    names["pre_tokenizer_hashes"] = {**names["pre_tokenizer_hashes"], digest: "stablelm2"}
    monkeypatch.setattr(export, "llama_cpp_names", lambda: names)
    assert export._pre_tokenizer(tokenizer) == "stablelm2"


def test_an_unknown_split_is_refused(capsys, tmp_path):
    from tokenizers import pre_tokenizers

    tokenizer = _bpe_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    source = tmp_path / "source"
    _tiny_model("llama", len(tokenizer)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    assert main(["export", str(source), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "unsupported tokenizer pre-tokenizer ['Whitespace']" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_out_folder_is_created(bpe_llama_dir, tmp_path):
    out = tmp_path / "new" / "deeper" / "tiny.gguf"
    assert main(["export", str(bpe_llama_dir), "--format", "gguf", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.README.md", "tiny.gguf"]


def test_out_folder_that_cannot_be_made_is_one_line(bpe_llama_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("kept")
    out = tmp_path / "file" / "tiny.gguf"
    assert main(["export", str(bpe_llama_dir), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot create its folder" in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "kept"


@pytest.mark.parametrize("family, split, gguf_arch", [("mistral", "gpt-2", "llama"), ("qwen2", "qwen2", "qwen2"),
                                                      ("qwen3", "qwen2", "qwen3"), ("llama", "llama-bpe", "llama")])
def test_family_round_trip(tmp_path, family, split, gguf_arch):
    """Each family's file holds its rounded weights (checked tensor by tensor, or by transformers'
    logits for llama) under llama.cpp's names, and its tokenizer reads back with identical ids through
    transformers' GGUF reader: Llama-3's tiktoken-style split (`llama-bpe`) and Qwen2's included."""
    import gguf

    tokenizer = _bpe_tokenizer(split)
    source = tmp_path / "source"
    overrides = {"attention_bias": True} if family == "llama" else {}  # q/k biases take the rope reorder
    _tiny_model(family, len(tokenizer), **overrides).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / f"{family}.gguf"
    assert main(["export", str(source), "--format", "gguf", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    assert (_field(reader, "general.architecture"), _field(reader, "tokenizer.ggml.pre")) == (gguf_arch, split)
    names = {tensor.name for tensor in reader.tensors}
    if family == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.1.attn_v.bias"} <= names
    if family == "qwen3":
        assert {"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names
        assert _field(reader, "qwen3.attention.key_length") == 32
    gguf_tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in (TEXT, "Numbers 1234567 and it's   spaced\n\nout"):
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text


def test_a_name_llama_cpp_refuses_is_never_written(bpe_llama_dir, tmp_path, monkeypatch, capsys):
    from losia_cli import export

    monkeypatch.setattr(export, "_pre_tokenizer", lambda tokenizer: "gpt2")  # what the first exporter wrote
    assert main(["export", str(bpe_llama_dir), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "llama.cpp does not accept 'gpt2' among its pre tokenizers" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
