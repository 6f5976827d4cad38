"""The `transformers` Trainer callback of the Python API (api.py `Tuned.trainer_kwargs`); TRL's
trainers are Trainers, so it serves SFTTrainer and DPOTrainer too.

It runs `tuned.step()` right after each optimizer update (`on_optimizer_step`: before the Trainer steps
the scheduler, so a re-localized slot's LR ramp starts at once), writes the method's records to
`args.output_dir/subnets.jsonl` (and the Trainer's logs to metrics.jsonl) as a `losia train` run dir
holds them, and keeps the method's state in each checkpoint dir so that `train(resume_from_checkpoint=...)`
continues exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from losia_cli import atomic
from losia_cli.engine.checkpoint import _torch_save
from losia_cli.engine.records import RunRecords
from losia_cli.errors import ConfigError

METHOD_STATE = "losia_method.pt"  # the method's state, next to a Trainer checkpoint's own files


class LosiaCallback(TrainerCallback):
    def __init__(self, tuned):
        self.tuned = tuned
        self.records: RunRecords | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps != self.tuned.total_steps:
            raise ConfigError(f"the Trainer takes {state.max_steps} steps but prepare(total_steps="
                              f"{self.tuned.total_steps}): give prepare() the Trainer's max_steps")
        resumed = state.global_step > 0
        if resumed:  # the Trainer has restored the weights, optimizer and scheduler: now the method
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / METHOD_STATE
            if not path.is_file():
                raise ConfigError(f"{path}: missing; resume from a checkpoint this callback saved (in args.output_dir)")
            self.tuned.load_state_dict(torch.load(path, weights_only=True))
        if not state.is_world_process_zero:
            return
        self.records = RunRecords(Path(args.output_dir))
        # A resumed run keeps the records up to its checkpoint; a fresh one starts from prepare()'s.
        self.records.truncate_after(state.global_step if resumed else -1)
        if not resumed:
            for record in self.tuned.records:
                self.records.write(record["stream"], {k: v for k, v in record.items() if k != "stream"})
        self.tuned._records.listeners.append(self.records.write)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.tuned.step(self.tuned._optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.records is not None and logs:
            self.records.metric({"step": state.global_step, **logs})

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / METHOD_STATE
            with atomic.file(path) as tmp:
                _torch_save(self.tuned.state_dict(), tmp)

    def on_train_end(self, args, state, control, **kwargs):
        if self.records is not None:
            self.tuned._records.listeners.remove(self.records.write)
            self.records.close()
            self.records = None
