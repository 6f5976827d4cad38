"""`losia compare seeds= lr_grid=`: the bootstrap interval, the learning rate chosen on validation
only, eval items refused when training reads them; the quality benchmark's committed splits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from losia_cli.compare import bootstrap_interval

REPO = Path(__file__).resolve().parents[1]


def test_bootstrap_interval_hand_computable_cases():
    # One seed, items scoring 0 and 1: a replicate's mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4, so
    # the 2.5th and 97.5th percentiles of 2000 replicates are 0 and 1 (each end holds ~500 draws).
    assert bootstrap_interval([[0.0, 1.0]]) == (0.0, 1.0)
    assert bootstrap_interval([[0.25] * 7] * 3) == (0.25, 0.25)  # no variation: a point
    assert bootstrap_interval([[0.0, 1.0]], seed=3) == bootstrap_interval([[0.0, 1.0]], seed=3)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_items_and_seeds():
    rng = np.random.default_rng(0)
    table = (rng.random((2, 40)) < 0.6).astype(float)
    low, high = bootstrap_interval(table)
    assert low < table.mean() < high
    one_seed = table[:1]  # item noise alone: 10x the items at the same proportion, ~1/sqrt(10) the width
    width = np.subtract(*bootstrap_interval(one_seed)[::-1])
    assert np.subtract(*bootstrap_interval(np.tile(one_seed, (1, 10)))[::-1]) < width / 2
    # A seed that disagrees with the other widens it: seeds are resampled too.
    split = np.array([[1.0] * 20 + [0.0] * 20, [1.0] * 40])
    pooled = np.array([[1.0] * 30 + [0.0] * 10] * 2)  # the same 60 of 80 correct, spread evenly
    assert np.subtract(*bootstrap_interval(split)[::-1]) > np.subtract(*bootstrap_interval(pooled)[::-1])


def _fake_runs(monkeypatch, val_score, test_score):
    """train/load_target/run_eval stand-ins: training only writes report.json (and the validation
    results when asked); scores come from `val_score(lr)` and `test_score(lr)`."""
    import losia_cli.workflow
    import losia_cli.eval.command

    trained, tested = [], []

    def train(cfg, console=None):
        run_dir = Path(cfg.run.output_dir) / cfg.run.name
        (run_dir / "eval").mkdir(parents=True)
        (run_dir / "lr").write_text(repr(cfg.train.lr))
        (run_dir / "report.json").write_text(json.dumps({
            "trainable_params": 10, "final_loss": 1.0, "step_time_s": {"p50": 0.1}, "wall_s": 1.0,
            "peak_mem_bytes": 2**30, "optimizer_state_bytes": 80}))
        if cfg.eval.after_train:
            (run_dir / "eval" / "results.json").write_text(json.dumps(
                {"tasks": {t: {"metrics": {"acc": val_score(cfg.train.lr)}} for t in cfg.eval.tasks}}))
        trained.append((cfg.train.lr, cfg.seed, list(cfg.eval.tasks) if cfg.eval.after_train else None))
        return run_dir

    def run_eval(model, tokenizer, cfg, out_dir, identity, console, baseline=None):
        lr = float((Path(model) / "lr").read_text()) if isinstance(model, Path) else None
        score = 0.5 if lr is None else test_score(lr)
        if lr is not None:
            tested.append(lr)
        n_right = round(score * 4)
        samples = [{"correct": i < n_right} for i in range(4)]
        return {"tasks": {t.partition("@")[0]: {"metrics": {"acc": score}, "n": 4, "samples": samples} for t in cfg.tasks},
                "general_text_loss": {"loss": 2.0 if lr is None else 2.1, "tokens": 100}}

    monkeypatch.setattr(losia_cli.workflow, "train", train)
    monkeypatch.setattr(losia_cli.eval.command, "run_eval", run_eval)
    monkeypatch.setattr(losia_cli.eval.command, "load_target", lambda path: (Path(path), None, {}, None))
    return trained, tested


def test_lr_is_chosen_on_validation_not_test(tiny_llama_dir, tmp_path, monkeypatch):
    """Validation prefers 1e-3, test prefers 1e-4: compare must take 1e-3, train the grid with the
    validation tasks only, and score the test set only at the chosen rate."""
    from losia_cli.cli import main

    trained, tested = _fake_runs(monkeypatch, val_score=lambda lr: {1e-4: 0.2, 1e-3: 0.8}[lr],
                                 test_score=lambda lr: {1e-4: 1.0, 1e-3: 0.25}[lr])
    code = main([
        "compare", "methods=[lora]", "seeds=[7,8]", "lr_grid=[1e-4,1e-3]", "val_tasks=[boolq@bundled:boolq_sample]",
        f"model.name_or_path={tiny_llama_dir}", f"run.output_dir={tmp_path}", "data=gsm8k_sample",
        "eval.tasks=[piqa@bundled:piqa_sample]",
    ])
    assert code == 0
    grid = [(lr, seed, tasks) for lr, seed, tasks in trained if tasks is not None]
    assert grid == [(1e-4, 7, ["boolq@bundled:boolq_sample"]), (1e-3, 7, ["boolq@bundled:boolq_sample"])]
    assert [(lr, seed) for lr, seed, tasks in trained if tasks is None] == [(1e-3, 8)]  # seed 7's 1e-3 run reused
    assert tested == [1e-3, 1e-3]
    row = json.loads(next(tmp_path.glob("compare-*/compare.json")).read_text())["methods"][0]
    assert row["lr"] == 1e-3 and row["lr_grid_val"] == {"0.0001": 0.2, "0.001": 0.8}
    piqa = row["intervals"]["piqa"]
    assert piqa["per_seed"] == [0.25, 0.25] and piqa["mean"] == 0.25 and piqa["low"] <= 0.25 <= piqa["high"]
    assert piqa["change_vs_base"] == pytest.approx(-0.25)  # base scores 0.5 in the fake
    assert row["forgetting_per_seed"] == pytest.approx([0.1, 0.1])


def test_lr_grid_needs_a_validation_set_distinct_from_test(tmp_path, capsys):
    from losia_cli.cli import main

    assert main(["compare", "methods=[lora]", "lr_grid=[1e-4,1e-3]", f"run.output_dir={tmp_path}"]) == 2
    assert "lr_grid: choosing a learning rate needs val_tasks" in capsys.readouterr().err
    assert main(["compare", "methods=[lora]", "lr_grid=[1e-4,1e-3]", "val_tasks=[piqa@bundled:piqa_sample]",
                 "eval.tasks=[piqa@bundled:piqa_sample]", f"run.output_dir={tmp_path}"]) == 2
    assert "is also a test task" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_compare_refuses_test_items_that_training_reads(tiny_llama_dir, tmp_path, capsys):
    """The bundled GSM8K sample as both training data and test set: refused in one line before any
    training; a test file of different questions passes the same check."""
    from losia_cli.cli import main
    from losia_cli.compare import check_disjoint
    from losia_cli.compose import load_config
    from transformers import AutoTokenizer

    code = main(["compare", "methods=[lora]", f"model.name_or_path={tiny_llama_dir}", f"run.output_dir={tmp_path}",
                 "data=gsm8k_sample", "eval.tasks=[gsm8k@bundled:gsm8k_sample]", "eval.limit=3"])
    *notes, err = capsys.readouterr().err.strip().splitlines()  # the recipe's notes, then the one-line error
    assert code == 2 and all(n.startswith("note:") for n in notes)
    assert "3 of 3 eval items are also in the training data" in err
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written
    # A reworded-only-in-spacing copy of a training question still counts as seen.
    row = json.loads((REPO / "data_templates/samples/gsm8k_sample.jsonl").read_text().splitlines()[5])
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({**row, "question": "  " + row["question"].upper().replace(" ", "  ")}) + "\n")
    cfg = load_config([f"model.name_or_path={tiny_llama_dir}", "data=gsm8k_sample"], quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    with pytest.raises(Exception, match="1 of 1 eval items"):
        check_disjoint(cfg.data, [f"gsm8k@{test}"], None, tokenizer)
    check_disjoint(cfg.data, [f"gsm8k@{REPO / 'benchmarks/quality/data/math_test.jsonl'}"], None, tokenizer)


def test_benchmark_splits_are_disjoint_and_the_check_catches_a_leak(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks" / "quality"))
    import make_data

    assert make_data.check() == []
    for path in make_data.DATA.glob("*_*.jsonl"):
        (tmp_path / path.name).write_text(path.read_text())
    leaked = (tmp_path / "math_train.jsonl").read_text().splitlines()[0]
    with open(tmp_path / "math_test.jsonl", "a") as f:
        f.write(leaked + "\n")
    assert make_data.check(tmp_path) == ["math_test.jsonl: 1 question(s) also in math_train.jsonl"]


def test_general_text_file_is_read_or_refused(tmp_path):
    from losia_cli.errors import DataError
    from losia_cli.eval.forgetting import general_text_loss

    with pytest.raises(DataError, match="no such file"):
        general_text_loss(None, None, path=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="no text"):
        general_text_loss(None, None, path=tmp_path / "empty.txt")
