"""build_dataset: sources and formats, overlong policy, subsets, workers, packing layout, cache."""

from __future__ import annotations

import gzip
import json
import shutil

import datasets
import numpy as np
import pytest

from losia_cli.data import DataConfig, build_dataset, get_task, make_collator
from losia_cli.data.sources import samples_dir
from losia_cli.resources import templates_dir

IGNORE = -100
GSM8K = samples_dir() / "gsm8k_sample.jsonl"


def gsm8k_rows() -> list[dict]:
    return [json.loads(line) for line in GSM8K.read_text().splitlines()]


def flat(data) -> list[tuple]:
    return [tuple(map(tuple, (e["input_ids"], e["labels"]))) for e in data]


def build(tok, tmp_path=None, **fields):
    cfg = DataConfig(**{"task": "gsm8k", "source": "bundled:gsm8k_sample", **fields})
    return build_dataset(cfg, tok, cache_dir=tmp_path)


def test_local_formats_match_the_bundled_jsonl(tok, tmp_path):
    reference = flat(build(tok))
    rows = gsm8k_rows()
    ds = datasets.Dataset.from_list(rows)
    (tmp_path / "array.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.to_csv(str(tmp_path / "rows.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for source in ["array.json", "rows.jsonl.gz", "rows.parquet", "rows.csv", "saved", "saved_dict", arrow]:
        assert flat(build(tok, source=str(tmp_path / source))) == reference, source


def test_column_map_renames_source_fields(tok, tmp_path):
    rows = [{"problem": r["question"], "solution": r["answer"]} for r in gsm8k_rows()]
    (tmp_path / "renamed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build(tok, source=str(tmp_path / "renamed.jsonl"), column_map={"problem": "question", "solution": "answer"})
    assert flat(data) == flat(build(tok))


def test_overlong_policy(tok):
    full = build(tok)
    lengths = full.lengths
    limit = int(np.median(lengths))
    n_long = int((lengths > limit).sum())
    dropped = build(tok, max_length=limit, overlong="drop")
    assert dropped.stats["n_dropped_overlong"] == n_long and len(dropped) == len(full) - n_long
    truncated = build(tok, max_length=limit, overlong="truncate")
    assert truncated.stats["n_truncated"] == n_long and truncated.stats["n_dropped_overlong"] == 0
    assert truncated.lengths.max() == limit
    long_one = int(np.argmax(lengths > limit))
    assert truncated[long_one]["input_ids"] == full[long_one]["input_ids"][:limit]
    # Truncating inside the prompt leaves no target: such samples are dropped, not kept empty.
    prompt_lengths = sorted(e["labels"].index(next(x for x in e["labels"] if x != IGNORE)) for e in full)
    cut = build(tok, max_length=prompt_lengths[len(full) // 2])
    assert cut.stats["n_dropped_overlong"] > 0 and cut.stats["n_truncated"] > 0
    assert cut.stats["n_dropped_overlong"] + cut.stats["n_truncated"] == len(full)
    assert all(any(label != IGNORE for label in e["labels"]) for e in cut)


def test_max_samples_is_a_seeded_subset(tok):
    full = flat(build(tok))
    a, b = flat(build(tok, max_samples=10)), flat(build(tok, max_samples=10))
    other = flat(build(tok, max_samples=10, shuffle_seed=7))
    assert a == b and len(a) == 10 and a != other and set(a) <= set(full)
    assert a != full[:10]


def test_parallel_workers_give_identical_data(tok, monkeypatch):
    monkeypatch.setattr("losia_cli.data.tokenization.CHUNK_ROWS", 8)  # several chunks over 2 workers
    assert flat(build(tok, num_workers=2)) == flat(build(tok, num_workers=1))


def test_packing_layout(tok):
    plain = build(tok)
    packed = build(tok, packing=True, max_length=256)
    assert packed.stats["n_samples"] == len(plain) and len(packed) < len(plain)
    samples = []
    for row in packed:
        assert len(row["input_ids"]) <= 256
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        assert starts[0] == 0
        for s, e in zip(starts, starts[1:]):
            assert row["position_ids"][s:e] == list(range(e - s))
            assert row["labels"][s] == IGNORE  # no sample is trained to follow the previous one
            samples.append((tuple(row["input_ids"][s:e]), tuple(row["labels"][s:e])))
    assert sorted(samples) == sorted(flat(plain))  # every sample exactly once, never split

    batch = make_collator(DataConfig(task="gsm8k", source="x", packing=True, max_length=256), tok)([packed[0], packed[-1]])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    width = batch["input_ids"].shape[1]
    pad = len(packed[-1]["input_ids"])
    if pad < width:  # the short row's tail: pad ids, no loss, its own position block
        assert (batch["labels"][1, pad:] == IGNORE).all()
        assert batch["position_ids"][1, pad:].tolist() == list(range(width - pad))


def test_padding_collator(tok):
    data = build(tok)
    batch = make_collator(DataConfig(task="gsm8k", source="x"), tok)([data[0], data[1]])
    n0, n1 = len(data[0]["input_ids"]), len(data[1]["input_ids"])
    width = max(n0, n1)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    short = 0 if n0 < n1 else 1
    n = min(n0, n1)
    assert (batch["input_ids"][short, n:] == tok.eos_token_id).all()  # pad == eos for SmolLM2
    assert (batch["labels"][short, n:] == IGNORE).all() and (batch["attention_mask"][short, n:] == 0).all()
    assert batch["labels"][short, n - 1] == tok.eos_token_id  # the real EOS keeps its loss


def test_cache_hit_and_invalidation(tok, tmp_path):
    cache = tmp_path / "cache"
    first = build(tok, cache)
    second = build(tok, cache)
    assert not first.stats["cache_hit"] and second.stats["cache_hit"]
    assert second.stats["cache_path"] == first.stats["cache_path"]
    assert flat(first) == flat(second)
    assert {k: v for k, v in second.stats.items() if k not in ("cache_hit",)} == {
        k: v for k, v in first.stats.items() if k not in ("cache_hit",)}

    assert not build(tok, cache, max_length=300).stats["cache_hit"]  # setting changed
    assert not build(tok, cache, packing=True).stats["cache_hit"]
    assert not build(tok, cache, train_on_input=True).stats["cache_hit"]
    assert build(tok, cache, num_workers=2).stats["cache_hit"]  # does not change the result

    # Same task, edited template text -> rebuild, and the new format is what comes back.
    template = tmp_path / "gsm8k.yaml"
    shutil.copy(templates_dir() / "gsm8k.yaml", template)
    assert build(tok, cache, template=str(template)).stats["cache_hit"]  # identical text
    template.write_text(template.read_text().replace('"Question: ', '"Problem: '))
    edited = build(tok, cache, template=str(template))
    assert not edited.stats["cache_hit"] and flat(edited) != flat(first)

    # Edited data file -> rebuild.
    data_file = tmp_path / "rows.jsonl"
    shutil.copy(GSM8K, data_file)
    assert build(tok, cache, source=str(data_file)).stats["cache_hit"]  # keyed by content, not path
    data_file.write_text(data_file.read_text().replace("Zara", "Zoe"))
    assert not build(tok, cache, source=str(data_file)).stats["cache_hit"]
    assert not list(cache.glob(".tmp-*"))


def test_cache_key_covers_the_tokenizer(tok, tmp_path):
    import copy

    cache = tmp_path / "cache"
    build(tok, cache)
    other = copy.deepcopy(tok)
    other.add_tokens(["<new_token>"])
    assert not build(other, cache).stats["cache_hit"]


def test_hub_source_calls_load_dataset_with_id_config_split_revision(tok, monkeypatch):
    seen = {}
    fake = datasets.Dataset.from_list(gsm8k_rows())

    def load_dataset(path, name=None, split=None, revision=None):
        seen.update(path=path, name=name, split=split, revision=revision)
        return fake

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = build(tok, source="hub:openai/gsm8k", hub_config="main", split="train", revision="abc123")
    assert seen == {"path": "openai/gsm8k", "name": "main", "split": "train", "revision": "abc123"}
    assert flat(data) == flat(build(tok))


@pytest.mark.parametrize("recipe", sorted((templates_dir().parent / "recipes" / "data").glob("*.yaml")), ids=lambda p: p.stem)
def test_data_recipes_validate(recipe, tok):
    import yaml

    text = recipe.read_text()
    assert text.startswith("#") and "losia train" in text  # header comment with the command
    cfg = DataConfig.model_validate(yaml.safe_load(text))
    if all(part.source.startswith("bundled:") for part, _ in cfg.components()):  # offline ones build as they are
        data = build_dataset(cfg, tok, cache_dir=None)
        assert data.stats["n_samples"] >= data.stats["n_rows"] > 0  # text documents may be cut in pieces
    else:
        get_task(cfg.task)
