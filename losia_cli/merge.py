"""`losia merge`: turn a run into a plain Hugging Face model dir, verified before it is published.

LoSiA and full fine-tuning already hold full trained weights in `final/` (LoSiA writes its subnet
blocks through into W), so merging is serialization. PEFT adapters are folded with peft's own
`merge_and_unload`, in fp32. Everything is written into a temp dir, reloaded and compared, and only
then renamed to `--out`: a failed or interrupted merge leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from losia_cli import atomic
from losia_cli.model_card import write_model_card
from losia_cli.models import DTYPES

PEFT_METHODS = {"lora", "dora", "pissa"}


def probe_tokens(model) -> torch.Tensor:
    """Fixed token ids for the verification forward pass, valid for any vocabulary size."""
    return (torch.arange(1, 17) * 7919 % model.config.vocab_size).unsqueeze(0)


class MergeError(ValueError):
    """A run that cannot be merged, or a merge that failed verification."""


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise MergeError(f"{run_dir} is not a losia run dir (no config.yaml)")
    return yaml.safe_load(path.read_text())


def _load_plain(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # safetensors/transformers raise many types for a damaged dir
        raise MergeError(f"cannot read the model in {path}: {str(e).splitlines()[0]}") from None


def build_merged(run_dir: Path):
    """(merged plain model in fp32, the source dir holding the tokenizer, reference logits fn)."""
    from transformers import AutoTokenizer

    config = _run_config(run_dir)
    final = run_dir / "final"
    if not final.is_dir():
        hint = " (it has checkpoints: resume it to the end first)" if (run_dir / "checkpoints").is_dir() else ""
        raise MergeError(f"{run_dir} has no final/ : the run did not finish{hint}")
    method = config["method"]["name"]
    tokenizer = AutoTokenizer.from_pretrained(final)
    if method not in PEFT_METHODS:
        model = _load_plain(final)
        return model, tokenizer, None

    from peft import PeftModel

    from losia_cli.models import ModelConfig, resolve_model_path

    base = _load_plain(Path(resolve_model_path(ModelConfig(**config["model"]))))
    adapted = PeftModel.from_pretrained(base, final)
    with torch.no_grad():
        reference = adapted(probe_tokens(base)).logits  # the adapter model, before folding
    return adapted.merge_and_unload(), tokenizer, reference


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def merge(run_dir: Path, out: Path, *, dtype: str = "fp32", shard_size: str = "5GB", force: bool = False) -> dict:
    from losia_cli.engine.records import versions

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not force:
        raise MergeError(f"{out} already exists; pass --force to replace it")
    model, tokenizer, reference = build_merged(run_dir)
    # Cast the weights only: buffers such as rotary `inv_freq` stay fp32, as from_pretrained keeps them.
    for param in model.parameters():
        param.data = param.data.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    model.eval()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tokens = probe_tokens(model)
    with torch.no_grad():
        logits = model(tokens).logits

    with atomic.directory(out, overwrite=force) as tmp:
        model.save_pretrained(tmp, max_shard_size=shard_size)
        tokenizer.save_pretrained(tmp)
        reloaded = _load_plain(tmp, DTYPES[dtype]).eval()
        mismatched = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, state[k])]
        if mismatched:
            raise MergeError(f"verification failed: {len(mismatched)} tensors differ, e.g. {mismatched[0]}")
        with torch.no_grad():
            if not torch.equal(reloaded(tokens).logits, logits):
                raise MergeError("verification failed: the reloaded model's logits differ")
        method = _run_config(run_dir)["method"]["name"]
        manifest = {
            "source_run": str(run_dir.resolve()),
            "method": method,
            "dtype": dtype,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "verified": {"tensors_equal": len(state), "logits_equal": True},
            "tensors": {k: {"shape": list(v.shape), "sha256": _sha256(v)} for k, v in state.items()},
        }
        if reference is not None:
            # PEFT: how far the folded weights are from the adapter applied on the fly.
            diff = (logits.float() - reference.float()).abs().max().item()
            manifest["verified"]["max_abs_logit_diff_vs_adapter"] = diff
        atomic.write_json(tmp / "MANIFEST.json", manifest)
        write_model_card(tmp, run_dir, notes=[f"**dtype**: {dtype}, verified bit-exact after reload"])
    return manifest
