"""Train, evaluate, write the model card: what `losia train`, `losia compare` and continual stages run.

The engine trains and exports (engine/loop.py: setup -> run_steps -> finish); evaluating the exported
model (`eval.after_train`) and the card, which carries the scores, are done here, in one place, on
the command floor (docs/architecture.md, section 1), as torchtune keeps eval out of its recipe loop.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from losia_cli.config import RunConfig
from losia_cli.engine.loop import Trained, train as train_only
from losia_cli.model_card import write_model_card


def train(cfg: RunConfig, console: Console | None = None) -> Path:
    """Train `cfg`, evaluate it when `eval.after_train`, write final/README.md; the run dir."""
    console = console or Console(soft_wrap=True)

    def evaluate_and_describe(trained: Trained) -> None:  # run by the engine before it unlocks the run dir
        if trained.model is None:  # not the main process: rank 0 evaluates and writes
            return
        if cfg.eval.after_train:
            from losia_cli.eval.command import run_eval

            run_eval(trained.model, trained.tokenizer, cfg.eval, trained.run_dir / "eval",
                     {"run_dir": str(trained.run_dir)}, console)
        write_model_card(trained.run_dir / "final", trained.run_dir)  # after eval: the card carries its scores

    return train_only(cfg, console, then=evaluate_and_describe).run_dir
