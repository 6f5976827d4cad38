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
