"""`losia export TARGET --format gguf`: a model as one GGUF file for llama.cpp & co.

Tensors are renamed through the `gguf` package's own tensor-name map and written with its
GGUFWriter; the metadata keys, tensor conventions and vocabulary are the ones llama.cpp's
convert_hf_to_gguf.py writes for each architecture, and every name written is one llama.cpp
accepts (llama_cpp_names.json, taken from its source). The file is built beside `--out` and checked
against the source model whose weights went through the same rounding (f16 / bf16 / q8_0
round-trip): a Llama file is read back through transformers (`gguf_file=`) and its logits must
match exactly; for the other architectures (transformers cannot load a `gemma` file) every tensor
gguf's reader finds must equal the rounded source weight. tests/test_export_llamacpp.py runs the
files in llama.cpp itself. Only then is it renamed into place.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from losia_cli import atomic
from losia_cli.errors import ExportError
from losia_cli.extras import installed
from losia_cli.models import probe_tokens

OUTTYPES = ("f16", "bf16", "q8_0")
# q8_0 is also held to the unquantized model: max |logit drift| / max |logit| at most this (a check on
# the quantizer itself, which the exact comparison shares). SmolLM2-135M measures 0.044 (bf16 0.007).
Q8_0_RELATIVE_TOLERANCE = 0.1
# HF model_type -> GGUF architecture (llama.cpp's converter writes Mistral as `llama`).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma"}
# llama.cpp runs `llama` with GGML's interleaved rope, so q/k rows are reordered from HF's rotate-half
# layout; its qwen2, qwen3 and gemma graphs use the NEOX rope, which is HF's layout.
INTERLEAVED_ROPE = ("llama",)
# Those transformers (5.23) loads from GGUF: its loader knows gemma2-4 but not the first Gemma.
RELOADABLE = ("llama",)
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# A byte-level BPE split written as a Split regex before ByteLevel(use_regex=False) -> llama.cpp's
# pre-tokenizer with that regex (src/llama-vocab.cpp), in the form released tokenizer.json files carry.
SPLIT_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "llama-bpe",  # Llama-3 (tiktoken's cl100k split)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "qwen2",  # Qwen2 / Qwen3: the same with single digits
}


def _reloadable(config) -> bool:
    """Whether transformers reads this model back from GGUF as written: its reader undoes the rope
    reorder of q/k weights but not of q/k biases (which llama.cpp's converter reorders too)."""
    return config.model_type in RELOADABLE and not getattr(config, "attention_bias", False)


@functools.cache
def llama_cpp_names() -> dict:
    """The names llama.cpp accepts and its converter's pre-tokenizer hashes (see the file's `source`)."""
    return json.loads((Path(__file__).with_name("llama_cpp_names.json")).read_text(encoding="utf-8"))


def _qtype(outtype: str):
    from gguf import GGMLQuantizationType as Q

    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


def _file_type(outtype: str):
    from gguf import LlamaFileType as F

    return {"f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[outtype]


def _rope_interleave(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k projection rows from HF's rotate-half rotary layout into GGML's interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _accepted(kind: str, name: str) -> str:
    """`name` if llama.cpp accepts it as one of its `kind` ("architectures", "tokenizer_models",
    "pre_tokenizers"): a name it does not know makes it refuse the whole file."""
    if name not in llama_cpp_names()[kind]:
        raise ExportError(f"GGUF export: llama.cpp does not accept {name!r} among its {kind.replace('_', ' ')}")
    return name


def _spm(tokenizer) -> bool:
    """A sentencepiece vocabulary (Llama-2, Gemma) as transformers holds it: BPE with byte fallback."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return model["type"] == "BPE" and bool(model.get("byte_fallback"))


def _check_supported(model, tokenizer) -> None:
    """Refuse before writing anything: another architecture, rope scaling, an unknown tokenizer."""
    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise ExportError(f"GGUF export cannot write architecture {config.model_type!r} (model_type); it writes "
                          f"{', '.join(ARCHITECTURES)}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported")
    # llama.cpp's gemma graph hard-codes these: tanh-GELU, output through token_embd
    if config.model_type == "gemma" and (config.hidden_act != "gelu_pytorch_tanh" or not config.tie_word_embeddings):
        raise ExportError(f"GGUF export: Gemma needs hidden_act gelu_pytorch_tanh and tied embeddings; this "
                          f"one has {config.hidden_act!r}, tie_word_embeddings={config.tie_word_embeddings}")
    if _spm(tokenizer):
        return
    if config.model_type == "gemma":
        raise ExportError("GGUF export: Gemma needs its sentencepiece (byte-fallback BPE) tokenizer")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ExportError(f"GGUF export: tokenizer model {spec['model']['type']} is not supported "
                          "(byte-level or sentencepiece BPE is)")
    _pre_tokenizer(tokenizer)


def _to_gguf(model):
    """(gguf name, float32 data) per tensor, with llama.cpp's conventions applied: Llama's q/k rows
    (and biases) interleaved for GGML's rope, Gemma's RMSNorm weights stored +1 (HF computes x * (1 + w), llama.cpp
    x * w; both in fp32, so the sum rounds the same)."""
    import gguf

    config = model.config
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == ARCHITECTURES[config.model_type])
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    interleave = ARCHITECTURES[config.model_type] in INTERLEAVED_ROPE
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd, transformers re-ties on load
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"GGUF export: no GGUF name for tensor {hf_name!r}")
        tensor = tensor.detach().float().cpu()
        if config.model_type == "gemma" and hf_name.endswith("norm.weight"):
            tensor = tensor + 1
        elif interleave and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _rope_interleave(tensor, config.num_attention_heads)
        elif interleave and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _rope_interleave(tensor, config.num_key_value_heads)
        yield name, tensor.numpy()


def _gguf_tensors(model, outtype: str):
    """(gguf name, data for the writer, its GGML type) per tensor; 1-D tensors (norms) stay F32,
    as llama.cpp keeps them."""
    import gguf

    for name, data in _to_gguf(model):
        if data.ndim == 1:
            yield name, data, gguf.GGMLQuantizationType.F32
        else:
            qtype = _qtype(outtype)
            yield name, gguf.quants.quantize(data, qtype), qtype


def _pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (its split before merges), found
    as llama.cpp's converter finds it: by the hash of the ids its check text encodes to, which names
    the released tokenizers llama.cpp knows. Another vocabulary (trained here, or converted from a
    GGUF) hashes to nothing known; then the split itself names it."""
    names = llama_cpp_names()
    digest = hashlib.sha256(str(tokenizer.encode(names["check_text"])).encode()).hexdigest()
    if digest in names["pre_tokenizer_hashes"]:
        return names["pre_tokenizer_hashes"][digest]
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = spec.get("pretokenizers", [spec])
    kinds = [step.get("type") for step in steps]
    # llama.cpp's byte-level BPE never adds a prefix space
    if kinds[-1:] == ["ByteLevel"] and not steps[-1].get("add_prefix_space"):
        regex = steps[-1].get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and regex and steps[0].get("individual_digits"):
            return "smollm"  # SmolLM / SmolLM2: digits one by one, then GPT-2's split
        if (kinds == ["Split", "ByteLevel"] and not regex and steps[0].get("behavior") == "Isolated"
                and not steps[0].get("invert") and steps[0]["pattern"].get("Regex") in SPLIT_PRE_TOKENIZERS):
            return SPLIT_PRE_TOKENIZERS[steps[0]["pattern"]["Regex"]]
    raise ExportError(f"GGUF export: unsupported tokenizer pre-tokenizer {kinds}; byte-level BPE with GPT-2's, "
                      "SmolLM's, Llama-3's or Qwen2's split is supported")


def _add_bpe_vocab(writer, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE vocabulary (SmolLM2): tokens, types and merges, as llama.cpp's `gpt2` model."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())  # checked by _check_supported
    vocab = tokenizer.get_vocab()
    tokens = [f"[PAD{i}]" for i in range(max(vocab_size, len(vocab)))]
    types = [gguf.TokenType.UNUSED] * len(tokens)
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model(_accepted("tokenizer_models", "gpt2"))
    writer.add_tokenizer_pre(_accepted("pre_tokenizers", _pre_tokenizer(tokenizer)))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_add_space_prefix(False)


def _sentencepiece(tokenizer):
    """The tokenizer's sentencepiece model, or None: no sentencepiece package, no tokenizer.model
    beside the tokenizer (a run's final/ has none), or one holding another vocabulary (stale)."""
    if installed("sentencepiece") is None:
        return None
    from sentencepiece import SentencePieceProcessor

    for candidate in (getattr(tokenizer, "vocab_file", None), Path(tokenizer.name_or_path) / "tokenizer.model"):
        if candidate and Path(candidate).is_file():
            sp = SentencePieceProcessor(model_file=str(candidate))
            n = min(sp.vocab_size(), len(tokenizer))
            if tokenizer.convert_ids_to_tokens(list(range(n))) == [sp.IdToPiece(i) for i in range(n)]:
                return sp
    return None


def _spm_base_vocab(tokenizer, tokens: list, scores: list, types: list) -> None:
    """Fill in the base vocabulary as llama.cpp's converter reads it: from tokenizer.model through
    sentencepiece (its own scores and types), else from tokenizer.json. There llama.cpp writes -1000
    for every score, which loses the merge order llama.cpp's tokenizer ranks pairs by; the rank of
    the merge that makes a piece keeps it (sentencepiece's BPE scores are that order too)."""
    import gguf

    T = gguf.TokenType
    if (sp := _sentencepiece(tokenizer)) is not None:
        for i in range(min(sp.vocab_size(), len(tokens))):
            tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
            types[i] = (T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else
                        T.UNUSED if sp.IsUnused(i) else T.BYTE if sp.IsByte(i) else T.NORMAL)
        return
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    rank: dict[str, int] = {}
    for index, (left, right) in enumerate(merges):
        rank.setdefault(left + right, index)
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, (T.UNKNOWN if i == tokenizer.unk_token_id else
                                      T.BYTE if BYTE_TOKEN.fullmatch(token) else T.NORMAL)
        # sentencepiece scores the unknown and byte pieces 0, the characters below every merge
        scores[i] = 0.0 if types[i] != T.NORMAL else -float(rank.get(token, len(merges) + i))


def _add_spm_vocab(writer, tokenizer, vocab_size: int) -> None:
    """A sentencepiece vocabulary (Llama-2, Gemma) as llama.cpp's `llama` tokenizer model: tokens,
    scores and types. Added tokens (<s> too) get score -1000 and are control if special, else
    user-defined with "▁" written as the space it stands for, as llama.cpp's converter does; the
    unknown and byte pieces keep their types (llama.cpp would retype <unk> as control)."""
    import gguf

    size = max(vocab_size, len(tokenizer))
    tokens, scores, types = [f"[PAD{i}]" for i in range(size)], [-10000.0] * size, [gguf.TokenType.UNUSED] * size
    _spm_base_vocab(tokenizer, tokens, scores, types)
    for i, added in tokenizer.added_tokens_decoder.items():
        if types[i] not in (gguf.TokenType.UNKNOWN, gguf.TokenType.BYTE):
            tokens[i] = added.content if added.special else added.content.replace("\u2581", " ")
            types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
            scores[i] = -1000.0
    writer.add_tokenizer_model(_accepted("tokenizer_models", "llama"))
    writer.add_tokenizer_pre(_accepted("pre_tokenizers", "default"))
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    # Llama-2 puts "▁" before the text, Gemma does not; ask the tokenizer rather than its config.
    first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))[0]
    writer.add_add_space_prefix(first.startswith("\u2581"))


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The vocabulary, then what llama.cpp needs around it: special ids, BOS/EOS flags, chat template."""
    if _spm(tokenizer):
        _add_spm_vocab(writer, tokenizer, vocab_size)
    else:
        _add_bpe_vocab(writer, tokenizer, vocab_size)
    # What the tokenizer does, not its `add_bos_token` attribute (transformers 5 keeps that False
    # for a Llama-2 tokenizer whose post-processor adds <s>).
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _add_hparams(writer, config, name: str, outtype: str) -> None:
    import gguf

    rope = getattr(config, "rope_parameters", None) or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    # Gemma's and Qwen3's heads are not hidden_size / heads wide (Gemma 2B: 256 vs 2048/8)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if config.model_type != "gemma":
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write(path: Path, model, tokenizer, name: str, outtype: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, _accepted("architectures", ARCHITECTURES[model.config.model_type]))
    _add_hparams(writer, model.config, name, outtype)
    _add_tokenizer(writer, tokenizer, model.config.vocab_size)
    for tensor_name, data, qtype in _gguf_tensors(model, outtype):
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def round_like_gguf_(model, outtype: str):
    """Round every 2-D weight of `model` in place as the file stores it: the exact reference for a
    reload (in place: a second copy of a 7B model is 28 GB)."""
    import gguf

    qtype = _qtype(outtype)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:  # q8_0 blocks run along rows, so rounding commutes with the rope reorder
                data = param.detach().float().cpu().numpy()
                param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)))
    return model


def load_gguf(path: Path):
    """The model in a GGUF file, as transformers reads it (dequantized to fp32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _verify(path: Path, rounded, tokens: torch.Tensor, expected: torch.Tensor, outtype: str) -> None:
    """The file holds `rounded` (the model after `round_like_gguf_`). Read back through transformers,
    its logits on `tokens` equal `expected`; where transformers cannot load the architecture, every
    tensor gguf's own reader finds equals the rounded weight, with llama.cpp's conventions applied."""
    import gguf

    model_type = rounded.config.model_type
    if _reloadable(rounded.config):
        with torch.no_grad():
            reloaded = load_gguf(path)(tokens).logits
        if not torch.equal(reloaded, expected):
            diff = (reloaded - expected).abs().max().item()
            raise ExportError(f"verification failed: reloaded logits differ from the {outtype}-rounded "
                              f"model's by up to {diff:.3e}")
        return
    stored = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    for name, data in _to_gguf(rounded):  # one tensor at a time: a float32 copy of 2B weights is 10 GB
        if (tensor := stored.pop(name, None)) is None:
            raise ExportError(f"verification failed: the file has no tensor {name}")
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(data.shape)
        if not np.array_equal(got, data):
            raise ExportError(f"verification failed: {name} differs from the {outtype}-rounded {model_type} "
                              f"weight by up to {np.abs(got - data).max():.3e}")
    if stored:
        raise ExportError(f"verification failed: the file has tensors the model does not: {sorted(stored)}")


def export_gguf(model, tokenizer, out: Path, *, outtype: str = "f16", name: str = "model",
                force: bool = False) -> dict:
    """Write, read back and verify `out`; returns what was verified (for the CLI and the model card).
    `model` ends with its weights rounded to `outtype`."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    _check_supported(model, tokenizer)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"--out {out}: cannot create its folder ({error.strerror})") from None
    model = model.float().eval()
    tokens = probe_tokens(model)
    with torch.no_grad():
        unrounded = model(tokens).logits
    with atomic.file(out) as tmp:
        tmp = tmp.with_name(tmp.name + ".gguf")  # transformers wants the suffix
        try:
            _write(tmp, model, tokenizer, name, outtype)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            with torch.no_grad():
                expected = round_like_gguf_(model, outtype)(tokens).logits  # `model` is spent from here
            _verify(tmp, model, tokens, expected, outtype)
            # the file's model is the rounded one (verified above), so this is the file's drift
            drift = (expected - unrounded).abs().max().item()
            relative = drift / unrounded.abs().max().item()
            if outtype == "q8_0" and relative > Q8_0_RELATIVE_TOLERANCE:
                raise ExportError(f"verification failed: q8_0 logits drift {relative:.3f} of their range "
                                  f"> {Q8_0_RELATIVE_TOLERANCE}")
            tmp.rename(tmp.with_suffix(""))
        finally:
            tmp.unlink(missing_ok=True)
    return {"outtype": outtype, "verified_by": "logits" if _reloadable(model.config) else "tensors",
            "max_abs_logit_drift": drift, "relative_logit_drift": relative, "bytes": out.stat().st_size}
