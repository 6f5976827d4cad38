"""Optional experiment trackers (`run.loggers: [tensorboard, wandb]`), fed by RunRecords.

The run dir stays the record of a run; a logger gets a copy of what goes there: every metrics.jsonl
record as scalars at its step, the resolved config (TensorBoard: text + hparams; W&B: run config)
and report.json's numbers as the run's summary. Each is an optional extra, imported only when used.
"""

from __future__ import annotations

import json
from numbers import Real
from pathlib import Path


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as {"a/b": value}; lists, strings and None are left out."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, Real) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def _hparam(value):
    """TensorBoard hparams take numbers, strings and bools only."""
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value)


def _leaves(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _hparam(value)
    return out


class TensorBoardLogger:
    """Event files in RUN_DIR/tensorboard: `tensorboard --logdir runs/` shows every run."""

    def __init__(self, run_dir: Path, config: dict):
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir) / "tensorboard"
        self.config = config
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```")

    def metric(self, record: dict) -> None:
        step = record["step"]
        for key, value in flatten(record).items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def summary(self, report: dict) -> None:
        # hparams + their final metrics make the run comparable in TensorBoard's HPARAMS tab;
        # run_name="." keeps them in this run's own folder instead of a new timestamped one.
        self.writer.add_hparams(
            _leaves(self.config), {f"report/{k}": v for k, v in flatten(report).items()}, run_name="."
        )
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run in RUN_DIR/wandb; WANDB_MODE=offline logs without network
    (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it later)."""

    def __init__(self, run_dir: Path, config: dict, project: str, name: str | None):
        import wandb

        self.run = wandb.init(project=project, dir=str(run_dir), name=name, config=config)

    def metric(self, record: dict) -> None:
        self.run.log({k: v for k, v in flatten(record).items() if k != "step"}, step=record["step"])

    def summary(self, report: dict) -> None:
        self.run.summary.update(flatten(report))

    def close(self) -> None:
        self.run.finish()


def open_loggers(run_dir: Path, config: dict) -> list:
    """The loggers `config["run"]["loggers"]` asks for (config: the resolved run config)."""
    run = config.get("run") or {}
    loggers = []
    for name in run.get("loggers") or []:
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir, config))
        elif name == "wandb":
            loggers.append(WandbLogger(run_dir, config, run.get("wandb_project", "losia"), run.get("name")))
    return loggers
