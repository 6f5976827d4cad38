"""Mixtures (data.sources) and validation data (data.val_split / data.val_source): deterministic
from the seed, the expected proportions, held-out rows disjoint from training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from losia_cli.data import DataConfig, build_dataset
from losia_cli.errors import DataError
from losia_cli.data.dataset import mixture_order

GSM8K, ALPACA = "bundled:gsm8k_sample", "bundled:alpaca_sample"  # 64 and 12 rows


def mixture(**fields) -> DataConfig:
    return DataConfig(task="gsm8k", sources=[{"source": GSM8K, "weight": 3}, {"source": ALPACA, "task": "alpaca"}], **fields)


def samples(data) -> list[tuple]:
    return [tuple(data[i]["input_ids"]) for i in range(len(data))]


def test_mixture_is_the_same_on_every_build_and_has_the_weighted_shares(tok, tmp_path):
    first = build_dataset(mixture(), tok, cache_dir=None)
    again = build_dataset(mixture(), tok, cache_dir=tmp_path)
    cached = build_dataset(mixture(), tok, cache_dir=tmp_path)
    assert not again.stats["cache_hit"] and cached.stats["cache_hit"]
    assert samples(first) == samples(again) == samples(cached)

    # 76 samples in all; 3:1 -> 57 from GSM8K (64, subsampled) and 19 from Alpaca (12, repeated)
    gsm8k = set(samples(build_dataset(DataConfig(task="gsm8k", source=GSM8K), tok, cache_dir=None)))
    alpaca = samples(build_dataset(DataConfig(task="alpaca", source=ALPACA), tok, cache_dir=None))
    mixed = samples(first)
    assert len(mixed) == 76 and first.stats["mixture"] == [[GSM8K, 57], [ALPACA, 19]]
    assert sum(s in gsm8k for s in mixed) == 57 and len({s for s in mixed if s in gsm8k}) == 57  # no repeats
    assert sorted(mixed.count(s) for s in alpaca) == [1] * 5 + [2] * 7  # one full pass, then 7 more
    alpaca_at = [i for i, s in enumerate(mixed) if s not in gsm8k]
    assert alpaca_at not in (list(range(19)), list(range(57, 76)))  # interleaved, not appended

    other_seed = samples(build_dataset(mixture(shuffle_seed=7), tok, cache_dir=None))
    assert other_seed != mixed and sorted(set(other_seed) & set(alpaca)) == sorted(alpaca)


@pytest.mark.parametrize("sizes,weights", [([64, 12], [3, 1]), ([5, 5, 5], [1, 1, 1]), ([10, 3], [1, 9]), ([7], [2])])
def test_mixture_counts_sum_to_the_total_and_follow_the_weights(sizes, weights):
    order = mixture_order(sizes, weights, seed=0)
    counts = np.bincount(np.searchsorted(np.cumsum(sizes), order, side="right"), minlength=len(sizes))
    assert counts.sum() == sum(sizes)
    assert np.all(np.abs(counts - np.asarray(weights) / sum(weights) * sum(sizes)) < 1)
    assert np.array_equal(order, mixture_order(sizes, weights, seed=0))


def test_val_split_is_held_out_deterministically_and_disjoint(tok):
    cfg = DataConfig(task="gsm8k", source=GSM8K, val_split=0.25)
    train, val = build_dataset(cfg, tok, cache_dir=None), build_dataset(cfg, tok, cache_dir=None, split="val")
    assert (len(train), len(val)) == (48, 16)
    everything = samples(build_dataset(DataConfig(task="gsm8k", source=GSM8K), tok, cache_dir=None))
    assert sorted(samples(train) + samples(val)) == sorted(everything) and not set(samples(train)) & set(samples(val))
    assert samples(val) == samples(build_dataset(cfg, tok, cache_dir=None, split="val"))
    assert samples(val) != samples(build_dataset(cfg.model_copy(update={"shuffle_seed": 1}), tok, cache_dir=None, split="val"))
    assert build_dataset(DataConfig(task="gsm8k", source=GSM8K), tok, cache_dir=None, split="val") is None


def test_a_mixture_holds_out_rows_of_every_source(tok):
    train, val = build_dataset(mixture(val_split=0.1), tok, cache_dir=None), build_dataset(mixture(val_split=0.1), tok, cache_dir=None, split="val")
    assert len(val) == 6 + 1 and train.stats["mixture"] == [[GSM8K, 52], [ALPACA, 17]]  # of 58 + 11 rows
    assert not set(samples(train)) & set(samples(val))


def test_val_source_and_bad_val_settings(tok, tmp_path):
    rows = tmp_path / "val.jsonl"
    rows.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    val = build_dataset(DataConfig(task="gsm8k", source=GSM8K, val_source=str(rows)), tok, cache_dir=None, split="val")
    assert len(val) == 1 and "1 + 1?" in tok.decode(val[0]["input_ids"])
    with pytest.raises(DataError, match="val_split=0.01 of 12 rows leaves an empty validation set"):
        build_dataset(DataConfig(task="alpaca", source=ALPACA, val_split=0.01), tok, cache_dir=None)
    with pytest.raises(ValueError, match="not both"):
        DataConfig(task="gsm8k", source=GSM8K, val_split=0.1, val_source=str(rows))
    with pytest.raises(ValueError, match="exactly one of data.source and data.sources"):
        DataConfig(task="gsm8k", source=GSM8K, sources=[{"source": ALPACA}])
