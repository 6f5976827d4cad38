"""`losia export TARGET --format gguf`: a Llama-family model as one GGUF file for llama.cpp & co.

Tensors are renamed through the `gguf` package's own tensor-name map and written with its
GGUFWriter; the metadata keys are the ones llama.cpp's convert_hf_to_gguf.py writes for `llama`.
The file is built beside `--out`, read back through transformers (`gguf_file=`) and its logits
compared with the source model whose weights went through the same rounding (f16 / bf16 / q8_0
round-trip), which must match exactly; only then is it renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from losia_cli import atomic
from losia_cli.errors import ExportError
from losia_cli.models import probe_tokens

OUTTYPES = ("f16", "bf16", "q8_0")
# q8_0 is also held to the unquantized model: max |logit drift| / max |logit| at most this (a check on
# the quantizer itself, which the exact comparison shares). SmolLM2-135M measures 0.044 (bf16 0.007).
Q8_0_RELATIVE_TOLERANCE = 0.1


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


def _check_supported(model, tokenizer) -> None:
    """Refuse before writing anything: a non-Llama model, rope scaling, a non-BPE tokenizer."""
    config = model.config
    if config.model_type != "llama":
        raise ExportError(f"GGUF export supports Llama-family models (model_type llama); this one is "
                          f"{config.model_type!r}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ExportError(f"GGUF export: tokenizer model {spec['model']['type']} is not supported (BPE is)")
    _pre_tokenizer(spec.get("pre_tokenizer"))


def _gguf_tensors(model, outtype: str):
    """(gguf name, data for the writer, its GGML type) per tensor; 1-D tensors (norms) stay F32,
    as llama.cpp keeps them."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd, transformers re-ties on load
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"GGUF export: no GGUF name for tensor {hf_name!r}")
        tensor = tensor.detach().float().cpu()
        if hf_name.endswith("q_proj.weight"):
            tensor = _rope_interleave(tensor, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = _rope_interleave(tensor, config.num_key_value_heads)
        data = tensor.numpy()
        if data.ndim == 1:
            yield name, data, gguf.GGMLQuantizationType.F32
        else:
            qtype = _qtype(outtype)
            yield name, gguf.quants.quantize(data, qtype), qtype


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (the split before merges)."""
    kinds = [p.get("type") for p in (spec or {}).get("pretokenizers", [spec] if spec else [])]
    if kinds == ["ByteLevel"] and spec.get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and spec["pretokenizers"][0].get("individual_digits"):
        return "smollm"  # SmolLM / SmolLM2: digits one by one, then GPT-2's split
    raise ExportError(f"GGUF export: unsupported tokenizer pre-tokenizer {kinds}; "
                      "byte-level BPE (GPT-2 style, as SmolLM2's) is supported")


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())  # checked by _check_supported
    vocab = tokenizer.get_vocab()
    tokens = [f"[PAD{i}]" for i in range(max(vocab_size, len(vocab)))]
    types = [gguf.TokenType.UNUSED] * len(tokens)
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
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
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write(path: Path, model, tokenizer, name: str, outtype: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
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


def export_gguf(model, tokenizer, out: Path, *, outtype: str = "f16", name: str = "model",
                force: bool = False) -> dict:
    """Write, reload and verify `out`; returns what was verified (for the CLI and the model card).
    `model` ends with its weights rounded to `outtype`."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    _check_supported(model, tokenizer)
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
                reloaded = load_gguf(tmp)(tokens).logits
                drift = (reloaded - unrounded).abs().max().item()
                relative = drift / unrounded.abs().max().item()
                expected = round_like_gguf_(model, outtype)(tokens).logits  # `model` is spent from here
            if not torch.equal(reloaded, expected):
                diff = (reloaded - expected).abs().max().item()
                raise ExportError(f"verification failed: reloaded logits differ from the {outtype}-rounded "
                                  f"model's by up to {diff:.3e}")
            if outtype == "q8_0" and relative > Q8_0_RELATIVE_TOLERANCE:
                raise ExportError(f"verification failed: q8_0 logits drift {relative:.3f} of their range "
                                  f"> {Q8_0_RELATIVE_TOLERANCE}")
            tmp.rename(tmp.with_suffix(""))
        finally:
            tmp.unlink(missing_ok=True)
    return {"outtype": outtype, "logits_equal_to_rounded": True, "max_abs_logit_drift": drift,
            "relative_logit_drift": relative, "bytes": out.stat().st_size}
