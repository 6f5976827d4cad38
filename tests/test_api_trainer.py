"""The Python API inside transformers' Trainer and TRL's SFTTrainer / DPOTrainer (tiny model, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import losia_cli

from test_losia_support import FP64_ATOL

STEPS = 4
SAMPLES = [{"input_ids": ids, "labels": ids.clone()}
           for ids in torch.randint(3, 1000, (8, 16), generator=torch.Generator().manual_seed(0))]


class InOrder(Trainer):
    """The Trainer with its batches in dataset order, so that a plain loop can be given the same ones."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def args(out, **overrides):
    return TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, save_steps=2, logging_steps=1,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **overrides,
    )


def trainer_run(tiny_llama_dir, out, dtype=torch.float32, stop_at=None, resume=None):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype)
    tuned = losia_cli.prepare(model, "losia_pro", total_steps=STEPS, period=1)
    kwargs = tuned.trainer_kwargs(lr=1e-2, warmup_ratio=0.25)
    if stop_at:
        kwargs["callbacks"].append(StopAt(stop_at))
    InOrder(model=tuned.model, args=args(out), train_dataset=SAMPLES, **kwargs).train(resume_from_checkpoint=resume)
    return tuned


def test_trainer_changes_weights_only_inside_the_recorded_subnets(tiny_llama_dir, tmp_path):
    before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict().items()}
    after = trainer_run(tiny_llama_dir, tmp_path).merged().state_dict()
    records = [json.loads(line) for line in (tmp_path / "subnets.jsonl").read_text().splitlines()]
    assert any(r["source"] == "score" for r in records)  # blocks moved during the run
    allowed = {}
    for r in records:
        mask = allowed.setdefault(r["module"], torch.zeros(r["shape"], dtype=torch.bool))
        mask[torch.tensor(r["rows"])[:, None], torch.tensor(r["cols"])] = True
    for key, value in before.items():
        changed = after[key] != value
        assert not (changed & ~allowed.get(key, torch.zeros_like(changed))).any(), key
    assert all((after[k] != before[k]).any() for k in allowed)  # and every target did train


def test_trainer_resumed_from_its_checkpoint_is_bit_identical(tiny_llama_dir, tmp_path):
    straight = trainer_run(tiny_llama_dir, tmp_path / "straight").merged().state_dict()
    trainer_run(tiny_llama_dir, tmp_path / "resumed", stop_at=2)
    assert (tmp_path / "resumed" / "checkpoint-2" / "losia_method.pt").is_file()
    resumed = trainer_run(tiny_llama_dir, tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-2"))
    resumed = resumed.merged().state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    records = [(tmp_path / d / "subnets.jsonl").read_text() for d in ("straight", "resumed")]
    assert records[0] == records[1]  # the resumed run's records read as one uninterrupted run


def test_trainer_matches_the_plain_loop(tiny_llama_dir, tmp_path):
    """The same batches through the Trainer and a plain loop. The Trainer divides the summed token loss by
    the token count it counted, the model's own loss takes the mean: one computation rounded two ways,
    so fp64 and FP64_ATOL (tests/test_losia_support.py)."""
    trained = trainer_run(tiny_llama_dir, tmp_path, dtype=torch.float64).merged().state_dict()

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    tuned = losia_cli.prepare(model, "losia_pro", total_steps=STEPS, period=1)
    optimizer = tuned.optimizer(lr=1e-2)
    scheduler = tuned.scheduler(optimizer, warmup_ratio=0.25)
    for step in range(STEPS):
        samples = SAMPLES[step % 2 * 4:][:4]
        batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
        tuned.model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(tuned.model.parameters(), 1.0)  # the Trainer's max_grad_norm
        optimizer.step(), tuned.step(optimizer), scheduler.step(), optimizer.zero_grad()
    plain = tuned.merged().state_dict()
    for key in plain:
        torch.testing.assert_close(trained[key], plain[key], rtol=0, atol=FP64_ATOL)


def trl_kwargs(tiny_llama_dir, steps, **options):
    """(model, tokenizer, trainer kwargs) for a TRL trainer with LoSiA-Pro on the tiny model."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tuned = losia_cli.prepare(model, "losia_pro", total_steps=steps, rank_factor=0.25, **options)
    return tuned, AutoTokenizer.from_pretrained(tiny_llama_dir), tuned.trainer_kwargs(lr=1e-2)


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_trl_sft_trainer_trains_with_losia_pro(tiny_llama_dir, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    steps = 6
    tuned, tokenizer, kwargs = trl_kwargs(tiny_llama_dir, steps, period=3)
    data = Dataset.from_list([{"text": f"The answer to {i} plus {i} is {2 * i}."} for i in range(4)])
    config = SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, logging_steps=1,
                       report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", max_length=32)
    trainer = SFTTrainer(model=tuned.model, args=config, train_dataset=data, processing_class=tokenizer, **kwargs)
    trainer.train()
    losses = logged(trainer, "loss")
    assert len(losses) == steps and losses[-1] < losses[0] - 0.2  # 10.83 -> 10.51 nats on this CPU
    assert tuned.steps == steps and (tmp_path / "subnets.jsonl").is_file()


def test_trl_dpo_trainer_with_losia_pro_needs_no_reference_copy(tiny_llama_dir, tmp_path):
    """precompute_ref_log_probs: the reference log-probs are taken from the model before its first
    update (LoSiA starts from the base weights exactly), so no second copy of the model is held."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    steps = 6
    tuned, tokenizer, kwargs = trl_kwargs(tiny_llama_dir, steps, period=3)
    data = Dataset.from_list([
        {"prompt": f"Is {i} even?", "chosen": " yes" if i % 2 == 0 else " no", "rejected": " no" if i % 2 == 0 else " yes"}
        for i in range(4)
    ])
    config = DPOConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, logging_steps=1,
                       report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                       precompute_ref_log_probs=True, max_length=32)
    trainer = DPOTrainer(model=tuned.model, args=config, train_dataset=data, processing_class=tokenizer, **kwargs)
    assert trainer.ref_model is None
    trainer.train()
    margins = logged(trainer, "rewards/margins")
    # 0 at the first update (the policy is the reference), then growing: 0.014 ... 0.069 on this CPU.
    assert len(margins) == steps and margins[0] == 0.0
    assert all(a < b for a, b in zip(margins, margins[1:])) and margins[-1] > 0.03
