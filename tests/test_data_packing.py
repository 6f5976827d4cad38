"""Packed rows train exactly like the samples run one by one: a tiny in-code Llama gives the same
per-sample loss packed (position_ids, no attention_mask) as unpacked (padded batch or alone).

Token ids are mapped onto a compact vocabulary (only the ids these samples use) so the tiny model's
logits stay small; the mapping is a bijection, so nothing about the batches' structure changes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from losia_cli.data import DataConfig, build_dataset, make_collator
from test_losia_support import FP64_ATOL

IGNORE = -100


@pytest.fixture
def one_thread():
    """Tiny matmuls: OpenMP hand-off between threads costs more than the math on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(vocab_size: int, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    config._attn_implementation = attn
    # fp64: packed, padded and alone run the same sums over other shapes, which BLAS blocks differently.
    return LlamaForCausalLM(config).eval().double()


def compact(batch: dict, table: torch.Tensor) -> dict:
    out = dict(batch, input_ids=table[batch["input_ids"]])
    out["labels"] = torch.where(batch["labels"] == IGNORE, IGNORE, table[batch["labels"].clamp(min=0)])
    return out


def token_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position loss of the HF-shifted objective, and the shifted labels."""
    # use_cache=False: with a (default) cache object present, transformers does not look for packed
    # sequences in position_ids and would let samples attend across each other.
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return loss.view(labels.shape), labels


def per_sample_losses_packed(model, rows, collate) -> list[float]:
    batch = collate(rows)
    assert "attention_mask" not in batch
    loss, labels = token_losses(model, batch)
    starts = batch["position_ids"] == 0
    out = []
    for r in range(len(rows)):
        n = len(rows[r]["input_ids"])
        edges = starts[r, :n].nonzero().flatten().tolist() + [n]
        for s, e in zip(edges, edges[1:]):
            # label positions s+1..e-1 are the sample's (shifted index s..e-2)
            mask = labels[r, s : e - 1] != IGNORE
            out.append((loss[r, s : e - 1][mask].mean().item()))
    return out


def per_sample_losses_unpacked(model, samples, collate) -> list[float]:
    loss, labels = token_losses(model, collate(samples))
    return [loss[i][labels[i] != IGNORE].mean().item() for i in range(len(samples))]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_matches_unpacked_per_sample_loss(tok, attn, one_thread):
    common = dict(task="gsm8k", source="bundled:gsm8k_sample", max_length=256, max_samples=24)
    packed_cfg, plain_cfg = DataConfig(**common, packing=True), DataConfig(**common)
    packed = build_dataset(packed_cfg, tok, cache_dir=None)
    plain = build_dataset(plain_cfg, tok, cache_dir=None)
    rows = [packed[0], packed[1], packed[len(packed) - 1]]  # two full-ish rows and the shortest
    assert sum(r["position_ids"].count(0) for r in rows) > len(rows)  # rows really hold several samples

    used = sorted({t for r in rows for t in r["input_ids"]} | {tok.eos_token_id})
    table = torch.zeros(len(tok), dtype=torch.long)
    table[used] = torch.arange(len(used))
    model = tiny_llama(len(used), attn)
    pack = lambda rs: compact(make_collator(packed_cfg, tok)(rs), table)  # noqa: E731
    pad = lambda ss: compact(make_collator(plain_cfg, tok)(ss), table)  # noqa: E731
    with torch.no_grad():
        got = per_sample_losses_packed(model, rows, pack)
        # The same samples, unpacked: find them in the plain build by content.
        by_ids = {tuple(e["input_ids"]): e for e in plain}
        samples = []
        for row in rows:
            edges = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            samples += [by_ids[tuple(row["input_ids"][s:e])] for s, e in zip(edges, edges[1:])]
        padded = per_sample_losses_unpacked(model, samples, pad)
        alone = [per_sample_losses_unpacked(model, [s], pad)[0] for s in samples]

        # Control: the same packed rows with plain 0..L-1 positions let samples see each other.
        batch = pack(rows)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        leaked, _ = token_losses(model, batch)
        reference, _ = token_losses(model, pack(rows))

    assert len(got) == len(samples) > 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(alone), atol=FP64_ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(padded), torch.tensor(alone), atol=FP64_ATOL, rtol=0)
    assert not torch.allclose(leaked, reference, atol=1e-3)
