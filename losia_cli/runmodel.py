"""A run dir's trained model, whatever `final/` holds: full weights, a PEFT adapter (folded in), or a
LoSiA delta over its base (run.final=delta). Above models and delta, which it joins."""

from __future__ import annotations

from pathlib import Path

import torch

from losia_cli.delta import CONFIG, has_weights, load_with_delta
from losia_cli.errors import MergeError, RunFileError
from losia_cli.models import load_plain, load_tokenizer, probe_tokens, resolve_model_path, run_config


def load_run_model(run_dir: Path):
    """(the run's trained model in fp32 with any PEFT adapter folded in, its tokenizer, the adapter
    model's logits on `probe_tokens` before folding (None without an adapter))."""
    from losia_cli.engine.rundir import read_json
    from losia_cli.methods import exports_adapter

    config = run_config(run_dir)
    adapter = exports_adapter(config["method"]["name"])
    final = run_dir / "final"
    if not final.is_dir():
        hint = " (it has checkpoints: resume it to the end first)" if (run_dir / "checkpoints").is_dir() else ""
        raise MergeError(f"{run_dir} has no final/ : the run did not finish{hint}")
    # transformers and peft report a damaged JSON file as a traceback (or name no file): read them first.
    needed = {"tokenizer_config.json", "adapter_config.json" if adapter else "config.json"}
    for name in sorted(needed | {p.name for p in final.glob("*.json")}):
        read_json(final / name)
    tokenizer = load_tokenizer(str(final))
    if not adapter:

        if (final / CONFIG).is_file() and not has_weights(final):  # run.final=delta: base + delta
            return load_with_delta(final, dtype="fp32")[0], tokenizer, None
        return load_plain(final), tokenizer, None

    from peft import PeftModel
    from pydantic import ValidationError

    from losia_cli.config import ModelConfig, format_validation_error

    try:
        base_cfg = ModelConfig.model_validate(config.get("model"))
    except ValidationError as e:
        raise RunFileError(f"{run_dir / 'config.yaml'}: {format_validation_error(e, ('model',))}") from None
    base = load_plain(Path(resolve_model_path(base_cfg)))
    try:
        adapted = PeftModel.from_pretrained(base, final)
    except Exception as e:  # a truncated or damaged adapter: safetensors and peft raise many types
        raise MergeError(f"cannot read the adapter in {final}: {str(e).splitlines()[0]}") from None
    with torch.no_grad():
        reference = adapted(probe_tokens(base)).logits  # the adapter model, before folding
    return adapted.merge_and_unload(), tokenizer, reference
