"""Validation loss, early stopping, the best checkpoint, default checkpoints and mixture resume."""

from __future__ import annotations

import json

import torch

from losia_cli.engine.loop import train
from losia_cli.engine.validation import save_interval, validations_since_best
from test_engine import crash_then_resume, final_weights


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
