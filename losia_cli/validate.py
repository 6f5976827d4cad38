"""`losia recipes validate`: check a composed recipe end to end without training.

Keys and types are already checked by the time we get here (config.validate); this resolves the
model and the data source for real and shows two formatted samples with the loss mask visible.
"""

from __future__ import annotations

import os

from rich.console import Console

from losia_cli.config import RunConfig
from losia_cli.data import build_dataset, render_samples
from losia_cli.errors import ModelError
from losia_cli.models import load_tokenizer, resolve_model_path
from losia_cli.resources import cache_dir


def _is_hub_id(cfg: RunConfig, resolved: str) -> bool:
    return resolved == cfg.model.name_or_path and not os.path.exists(resolved)


def validate_recipe(cfg: RunConfig, console: Console) -> None:
    console.print(f"[green]ok[/] keys and types: recipe {cfg.recipe}, method {cfg.method.name}")
    resolved = resolve_model_path(cfg.model)
    try:
        tokenizer = load_tokenizer(resolved, cfg.model.revision, cfg.model.trust_remote_code)
    except ModelError:
        if _is_hub_id(cfg, resolved) and os.environ.get("HF_HUB_OFFLINE") == "1":
            console.print(
                f"[yellow]skipped[/] model {resolved}: a hub id, not reachable offline "
                "(HF_HUB_OFFLINE=1); data rendering needs its tokenizer and was skipped too"
            )
            return
        raise
    console.print(f"[green]ok[/] model {cfg.model.name_or_path} -> {resolved}")
    sources = cfg.data.source or ", ".join(s.source for s in cfg.data.sources)
    for split in ("train", "val"):
        data = build_dataset(cfg.data, tokenizer, cache_dir=cache_dir() / "data", split=split)
        if data is not None:
            console.print(f"[green]ok[/] data {sources} ({split}): {data.stats}")
    for i, sample in enumerate(render_samples(cfg.data, tokenizer, n=2), start=1):
        console.rule(f"sample {i} (dim = masked prompt, bold = trained target)")
        console.print(sample)
