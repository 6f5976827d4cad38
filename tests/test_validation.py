"""Validation loss, early stopping, the best checkpoint, default checkpoints and mixture resume."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_engine import crash_then_resume, final_weights
from test_losia_support import VOCAB, tiny_llama

from losia_cli.workflow import train
from losia_cli.engine.validation import mean_target_loss, save_interval, validations_since_best


def _rows(run_dir, key):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_val_loss_every_eval_every_steps_and_best_kept(tiny_config):
    run_dir = train(tiny_config("val", "data.val_split=0.2", "train.eval_every=2", "train.max_steps=5"))
    assert [r["step"] for r in _rows(run_dir, "val_loss")] == [2, 4, 5]  # and at the end
    best = json.loads((run_dir / "checkpoints" / "best" / "trainer_state.json").read_text())
    losses = {r["step"]: r["val_loss"] for r in _rows(run_dir, "val_loss")}
    assert losses[best["step"]] == min(losses.values())
    report = json.loads((run_dir / "report.json").read_text())
    assert report["val_loss"] == {"best": min(losses.values()), "final": losses[5]}


def test_no_val_rows_without_a_val_split(tiny_config):
    assert _rows(train(tiny_config("noval")), "val_loss") == []


def test_early_stopping_ends_the_run_after_patience_validations(tiny_config, monkeypatch):
    from losia_cli.engine import loop

    rising = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # never a new best after the first validation
    monkeypatch.setattr(loop, "mean_target_loss", lambda *a, **k: next(rising))
    run_dir = train(tiny_config("early", "data.val_split=0.2", "train.eval_every=1", "train.max_steps=6",
                                "train.early_stopping_patience=2"))
    assert [r["step"] for r in _rows(run_dir, "val_loss")] == [1, 2, 3]
    assert json.loads((run_dir / "report.json").read_text())["stopped_early_at"] == 3
    assert json.loads((run_dir / "checkpoints" / "best" / "trainer_state.json").read_text())["step"] == 1


def test_validations_since_best():
    assert validations_since_best([[1, 3.0], [2, 2.0], [3, 2.5], [4, 2.1]]) == 2
    assert validations_since_best([[1, 3.0]]) == 0


def test_checkpoints_are_on_by_default():
    assert save_interval(None, 30, "single") == 10  # the demo: two checkpoints
    assert save_interval(None, 10_000, "ddp") == 500
    assert save_interval(7, 30, "single") == 7
    assert save_interval(None, 30, "zero3") is None


def test_default_run_leaves_a_checkpoint_to_resume(tiny_config):
    run_dir = train(tiny_config("default-ckpt", "train.max_steps=12"))
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-10"]


def test_mixture_run_resumed_mid_run_is_bit_exact(tiny_config, tmp_path, monkeypatch):
    from losia_cli.engine import loop

    fresh = iter(range(100))  # every build mixes anew instead of reading the straight run's cache
    monkeypatch.setattr(loop, "cache_dir", lambda: tmp_path / f"cache-{next(fresh)}")
    common = ("data=mixture_sample", "data.max_length=64", "train.max_steps=5", "train.save_every=2",
              "train.eval_every=2")
    straight, resumed = crash_then_resume(tiny_config, tmp_path, monkeypatch, *common)
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curves = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, (d / "metrics.jsonl").open())]
              for d in (straight, resumed)]
    assert curves[0] == curves[1] and any(v is not None for _, _, v in curves[0])
    report = json.loads((straight / "report.json").read_text())
    assert [share for _, share in report["data"]["mixture"]] == [50, 17]  # 3:1 of the 67 samples that fit 64 tokens


def _sample(i: int) -> dict:
    ids = [(7 * i + j) % VOCAB for j in range(4 + i)]
    return {"id": i, "input_ids": ids, "labels": [-100, -100, *ids[2:]]}  # the prompt masked


# 9 samples of uneven length: 5 batches of 2 over 2 ranks, the last one short.
VAL = [_sample(i) for i in range(9)]


def _collate(rows: list[dict]) -> dict:
    """Right-padded batch; `seen` records the samples each process collated."""
    _collate.seen += [row["id"] for row in rows]
    width = max(len(row["input_ids"]) for row in rows)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    return {"input_ids": torch.tensor([padded(row["input_ids"], 0) for row in rows]),
            "attention_mask": torch.tensor([padded([1] * len(row["input_ids"]), 0) for row in rows]),
            "labels": torch.tensor([padded(row["labels"], -100) for row in rows])}


_collate.seen = []


def _val_loss_on_rank(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    _collate.seen = []
    try:
        model, forwards = tiny_llama(), []
        model.register_forward_pre_hook(lambda module, args: forwards.append(1))
        loss = mean_target_loss(model, VAL, _collate, 2, rank=rank, world=2)
        with open(f"{out}-{rank}.json", "w") as f:
            json.dump({"loss": loss, "seen": _collate.seen, "forwards": len(forwards)}, f)
    finally:
        dist.destroy_process_group()


def test_val_loss_is_sharded_over_ranks_and_matches_one_process(tmp_path):
    """Each of 2 gloo processes runs 3 of the 5 batches (the short rank one more, dropped: under FSDP a
    forward is collective), and the all-reduced token-weighted mean is one process's value."""
    one = mean_target_loss(tiny_llama(), VAL, _collate, 2)
    # spawn, not fork: a fork of this multi-threaded process (torch's OpenMP pool in use) can hang in the child.
    mp.start_processes(_val_loss_on_rank, args=(str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(abs(r["loss"] - one) < 1e-6 for r in ranks), (one, ranks)
    assert [r["forwards"] for r in ranks] == [3, 3]
    assert ranks[0]["seen"] == [0, 1, 4, 5, 8] and ranks[1]["seen"] == [2, 3, 6, 7, 0, 1]
