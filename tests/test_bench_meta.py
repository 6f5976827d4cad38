"""`losia bench device=meta`: measured FLOPs equal the closed formulas, and the bytes add up."""

from __future__ import annotations

import pytest

from losia_cli.bench import run_bench
from losia_cli.bench.meta import markdown_table
from losia_cli.cli import main

# Small, but with every part of a real shape (GQA, untied head, a vocabulary that matters).
SHAPE = dict(family="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
B, T = 4, 64


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    methods = ["floor", "full", "lora", "lora_bf16", "losia", "losia_pro"]
    return run_bench(SHAPE, methods, batch=B, seq=T, device="meta", lora_rank=4)["results"]


def test_measured_flops_equal_the_formulas(rows):
    for name, row in rows.items():
        assert row["flops"] == row["flops_analytic"], name


def test_pro_over_floor_matches_the_formula_within_one_percent(rows):
    """Fails if Pro's backward formed any full weight gradient beyond the scoring layer's (e.g. the
    block gradient sliced out of a dense G^T X): that is `losia`'s cost, far above the formula here."""
    pro, floor = rows["losia_pro"], rows["floor"]
    expected = pro["flops_analytic"] / floor["flops_analytic"]
    assert pro["flops"] / floor["flops"] == pytest.approx(expected, rel=0.01)
    assert rows["losia"]["flops"] / floor["flops"] > 1.01 * expected  # the mutation would land here


def test_bytes(rows):
    floor, full, pro = rows["floor"], rows["full"], rows["losia_pro"]
    assert floor["grad_bytes"] == floor["optimizer_state_bytes"] == floor["scorer_bytes"] == 0
    assert full["grad_bytes"] == full["param_bytes"]  # bf16 gradients for every bf16 weight
    # Two moments in the param dtype, and a 4-byte step counter per tensor.
    assert 0 < full["optimizer_state_bytes"] - 2 * full["param_bytes"] < 1024
    # Pro: fp32 block gradients, two fp32 moments each; the scoring layer (layer 0) holds three fp32
    # m x n buffers per targeted matrix.
    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    layer0 = 2 * h * h + 2 * h * kv + 3 * h * i
    assert pro["scorer_bytes"] == 3 * 4 * layer0
    assert 0 < pro["optimizer_state_bytes"] - 2 * pro["grad_bytes"] < 1024
    assert pro["grad_bytes"] == 4 * pro["trainable_params"]
    # peft's fp32 adapters under a bf16 base keep fp32 activations; lora_bf16 does not.
    assert rows["lora_bf16"]["activation_bytes"] < rows["lora"]["activation_bytes"]
    assert floor["activation_bytes"] < full["activation_bytes"]
    for row in rows.values():
        parts = ("param_bytes", "buffer_bytes", "grad_bytes", "optimizer_state_bytes", "activation_bytes",
                 "scorer_bytes")
        assert row["accounted_bytes"] == sum(row[k] for k in parts)


def test_op_counter_counts_work_and_its_bytes():
    """One op per kernel-launching aten call (views and allocations excluded); bytes are the distinct
    inputs read plus the outputs written (an in-place op's target both)."""
    import torch

    from losia_cli.bench.meta import OpCounter

    x, index = torch.empty(1000, device="meta"), torch.empty(10, dtype=torch.long, device="meta")
    a, b = torch.empty(10, 20, device="meta", dtype=torch.bfloat16), torch.empty(20, 30, device="meta", dtype=torch.bfloat16)
    with OpCounter() as count:
        y = x + x  # reads x once: 4000 + 4000
        y.view(10, 100).t()  # views: no kernel
        y.add_(x)  # reads y and x, writes y: 12000
        torch.mm(a, b)  # (200 + 600) * 2 read, 300 * 2 written
        torch.empty_like(y)
        y.index_copy_(0, index, x[:10])  # the index (80) and the source (40) read, 40 written
        y.index_put_((index,), x[:10], True)  # the same, `accumulate` given as the last argument
    assert (count.ops, count.traffic_bytes) == (5, 8000 + 12000 + 1600 + 600 + 160 + 160)


def test_traffic_and_ops_per_method(rows):
    """The counts the GPU lead is expected to come from: Pro moves fewer bytes in fewer ops than LoRA
    (peft's fp32 adapters: casts both ways) and than lora_bf16, and more than the floor."""
    floor, pro, lora, lora16 = (rows[m] for m in ("floor", "losia_pro", "lora", "lora_bf16"))
    assert floor["traffic_bytes"] < pro["traffic_bytes"] < lora16["traffic_bytes"] < lora["traffic_bytes"]
    assert floor["ops"] < pro["ops"] < lora16["ops"] < lora["ops"]
    assert pro["traffic_vs_lora"] == pro["traffic_bytes"] / lora["traffic_bytes"]


def test_table_and_cli(rows, tmp_path, capsys):
    table = markdown_table(list(rows.values()))
    assert table.count("\n") == len(rows) + 1 and "| losia_pro |" in table
    out = tmp_path / "meta.json"
    assert main(["bench", "model=llama_h512_l4", "methods=[floor,losia_pro]", "batch=2", "seq=32", "device=meta",
                 "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".md").read_text().count("| losia_pro |") == 1
    assert main(["bench", "model=nope", "device=meta"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
