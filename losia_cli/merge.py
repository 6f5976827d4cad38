"""`losia merge`: turn a run into a plain Hugging Face model dir, verified before it is published.

LoSiA and full fine-tuning already hold full trained weights in `final/` (LoSiA writes its subnet
blocks through into W), so merging is serialization. PEFT adapters are folded with peft's own
`merge_and_unload`, in fp32. Everything is written into a temp dir, reloaded and compared, and only
then renamed to `--out`: a failed or interrupted merge leaves nothing that looks complete.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import torch

from losia_cli import atomic
from losia_cli.provenance import tensor_sha256 as _sha256  # a name tests can patch
from losia_cli.errors import MergeError
from losia_cli.model_card import write_model_card
from losia_cli.models import DTYPES, load_plain, probe_tokens, run_config
from losia_cli.runmodel import load_run_model


def merge(run_dir: Path, out: Path, *, dtype: str = "fp32", shard_size: str = "5GB", force: bool = False) -> dict:
    run_dir, out = Path(run_dir), Path(out)
    _check_out(out, force)
    model, tokenizer, reference = load_run_model(run_dir)
    source = {"source_run": str(run_dir.resolve()), "method": run_config(run_dir)["method"]["name"]}
    return publish(model, tokenizer, out, source, run_dir, dtype=dtype, shard_size=shard_size, force=force,
                   reference=reference)


def merge_delta(delta: Path, base: str, out: Path, *, dtype: str = "fp32", shard_size: str = "5GB",
                force: bool = False) -> dict:
    """`losia merge --delta PATH --base BASE`: the base with the delta applied (refused before any write)."""
    from losia_cli.delta import load_with_delta, read_config

    out = Path(out)
    _check_out(out, force)
    model, tokenizer = load_with_delta(Path(delta), base)
    source = {"source_delta": str(Path(delta).resolve()), "base": base, "method": read_config(delta)["method"]}
    return publish(model, tokenizer, out, source, None, dtype=dtype, shard_size=shard_size, force=force)


def _check_out(out: Path, force: bool) -> None:
    if reason := atomic.foreign(out):  # first: --force would not help
        raise MergeError(f"--out: {reason}; not replacing it, choose another --out")
    if out.exists() and not force:
        raise MergeError(f"{out} already exists; pass --force to replace it")


def publish(model, tokenizer, out: Path, source: dict, run_dir: Path | None, *, dtype: str, shard_size: str,
            force: bool, reference: torch.Tensor | None = None) -> dict:
    """Write `model` as a plain HF dir at `out` in `dtype`, reloaded and compared before it is renamed in."""
    from losia_cli.provenance import versions

    # Cast the weights only: buffers such as rotary `inv_freq` stay fp32, as from_pretrained keeps them.
    for param in model.parameters():
        param.data = param.data.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    model.eval()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tokens = probe_tokens(model)
    with torch.no_grad():
        logits = model(tokens).logits

    with atomic.directory(out, overwrite=force, listed=True) as tmp:
        model.save_pretrained(tmp, max_shard_size=shard_size)
        tokenizer.save_pretrained(tmp)
        reloaded = load_plain(tmp, DTYPES[dtype]).eval()
        mismatched = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, state[k])]
        if mismatched:
            raise MergeError(f"verification failed: {len(mismatched)} tensors differ, e.g. {mismatched[0]}")
        with torch.no_grad():
            if not torch.equal(reloaded(tokens).logits, logits):
                raise MergeError("verification failed: the reloaded model's logits differ")
        manifest = {
            **source,
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
