"""Model cards: a run's final/ and `losia merge` output carry a Hub-format README.md."""

from __future__ import annotations

import yaml

from losia_cli.cli import main
from losia_cli.workflow import train


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_final_and_merged_cards(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["losia", "train", "method=lora"])
    run_dir = train(tiny_config("card", "method=lora", "train.max_steps=2", "eval.after_train=true",
                                "eval.tasks=[boolq@bundled:boolq_sample]", "eval.limit=2", "eval.forgetting=false"))
    card = (run_dir / "final" / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and {"losia", "lora"} <= set(meta["tags"])  # an adapter dir
    final_loss = yaml.safe_load((run_dir / "report.json").read_text())["final_loss"]
    assert "**steps**: 2" in card and f"{final_loss:.4f}" in card
    assert "| boolq | acc |" in card and "losia train method=lora" in card and "transformers:" in card

    assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    merged = (tmp_path / "merged" / "README.md").read_text()
    assert _front_matter(merged)["library_name"] == "transformers" and "lora" in _front_matter(merged)["tags"]
    assert "**dtype**: fp32" in merged and "| boolq |" in merged


def test_eval_and_the_card_are_written_while_the_run_dir_is_locked(tiny_config, monkeypatch):
    # The command layer's writes into the run dir (eval/, final/README.md) come before the engine lets go
    # of the run dir: a second `losia train` of the same run.name in between would be refused, not clear it.
    import pytest

    from losia_cli import workflow
    from losia_cli.engine.rundir import RunLock
    from losia_cli.errors import ConfigError

    held = []

    def card(final, run_dir):
        with pytest.raises(ConfigError, match="is in use by"):
            RunLock(run_dir)
        held.append(run_dir)

    monkeypatch.setattr(workflow, "write_model_card", card)
    run = train(tiny_config("locked", "train.max_steps=1"))
    assert held == [run]
    RunLock(run).release()  # and free once train() has returned
