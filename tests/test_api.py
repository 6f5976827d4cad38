"""The Python API (losia_cli/api.py): a plain loop through it trains exactly as `losia train`, and
misuse is one line."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

import losia_cli
from losia_cli.errors import ConfigError
from losia_cli.engine.loop import _micro_batch, train
from losia_cli.engine.step import token_loss_sum
from losia_cli.models import load_model, load_tokenizer, resolve_model_path
from losia_cli.resources import cache_dir


def plain_loop(cfg, method: str, **options):
    """`cfg`'s run written as a user's own loop over the API: same model, seed, batches and settings."""
    from losia_cli.data import build_dataset, make_collator

    tc = cfg.train
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path)
    data = build_dataset(cfg.data, tokenizer, cache_dir=cache_dir() / "data")
    collate = make_collator(cfg.data, tokenizer)
    set_seed(cfg.seed)
    model = load_model(cfg.model, path)
    tuned = losia_cli.prepare(model, method, total_steps=tc.max_steps, seed=cfg.seed, **options)
    optimizer = tuned.optimizer(lr=tc.lr, weight_decay=tc.weight_decay, betas=tc.betas, eps=tc.eps)
    scheduler = tuned.scheduler(optimizer, warmup_ratio=tc.warmup_ratio, min_lr_ratio=tc.min_lr_ratio)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for step in range(tc.max_steps):
        batch = _micro_batch(data, collate, step, tc.micro_batch_size, 1, 0, cfg.seed)
        labels = batch.pop("labels")
        targets = (labels[:, 1:] != -100).sum()
        loss = token_loss_sum(tuned.model(**batch, use_cache=False).logits, labels)
        (loss * (1 / targets.clamp(min=1))).backward()  # the engine's scale: the mean over target tokens
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        tuned.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    return tuned


@pytest.mark.parametrize("method, options", [
    ("losia_pro", {"period": 1}),  # 2 layers, a slot per step: both re-localize within the 4 steps
    ("lora", {"rank": 4}),
    ("galore", {"rank": 4, "update_proj_gap": 2}),
])
def test_plain_loop_matches_losia_train_bit_for_bit(tiny_config, method, options):
    if method == "galore":
        pytest.importorskip("galore_torch")
    overrides = [f"method.{key}={value}" for key, value in options.items()]
    cfg = tiny_config(method, f"method={method}", *overrides, "train.warmup_ratio=0.25", "train.lr=3e-3")
    run_dir = train(cfg).run_dir
    tuned = plain_loop(cfg, method, **options)
    if method == "lora":
        from peft import get_peft_model_state_dict

        ours, theirs = get_peft_model_state_dict(tuned.model), load_file(run_dir / "final" / "adapter_model.safetensors")
    else:
        ours, theirs = tuned.merged().state_dict(), load_file(next((run_dir / "final").glob("*.safetensors")))
    assert theirs.keys() <= ours.keys()
    changed = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not changed
    if method == "losia_pro":  # the same blocks, placed at the same steps, as subnets.jsonl records them
        written = [json.loads(line) for line in (run_dir / "subnets.jsonl").read_text().splitlines()]
        assert any(r["source"] == "score" for r in written)
        assert list(tuned.subnets()) == written


def tiny_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir)


def test_prepare_twice_is_one_line(tiny_llama_dir):
    model = tiny_model(tiny_llama_dir)
    losia_cli.prepare(model, "losia_pro", total_steps=2)
    with pytest.raises(ConfigError, match="prepared already") as e:
        losia_cli.prepare(model, "lora", total_steps=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["losia_pro", "lora"])
def test_no_matching_module_is_one_line(tiny_llama_dir, method):
    with pytest.raises(ConfigError, match=r"target_modules=\['nope'\]") as e:
        losia_cli.prepare(tiny_model(tiny_llama_dir), method, total_steps=2, target_modules=["nope"])
    assert "\n" not in str(e.value)


def test_unknown_method_and_option_are_one_line(tiny_llama_dir):
    model = tiny_model(tiny_llama_dir)
    with pytest.raises(ConfigError, match="method='losia_max'.*one of .*losia_pro") as e:
        losia_cli.prepare(model, "losia_max", total_steps=2)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="method.rank_factr") as e:
        losia_cli.prepare(model, "losia_pro", total_steps=2, rank_factr=0.1)
    assert "\n" not in str(e.value)
    losia_cli.prepare(model, "losia_pro", total_steps=2)  # the refusals left the model as it was


def test_step_without_an_optimizer_step_is_one_line(tiny_llama_dir):
    tuned = losia_cli.prepare(tiny_model(tiny_llama_dir), "losia_pro", total_steps=4, period=1)
    optimizer = tuned.optimizer(lr=1e-3)
    with pytest.raises(ConfigError, match="0 optimizer.step") as e:
        tuned.step(optimizer)
    assert "\n" not in str(e.value)
    assert tuned.steps == 0


def test_state_dict_resumes_exactly(tiny_llama_dir):
    """Four steps straight equal two, a save, a fresh prepare + load, and two more."""
    batch = {"input_ids": torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))}

    def run(tuned, optimizer, scheduler, steps):
        for _ in range(steps):
            tuned.model(**batch, labels=batch["input_ids"]).loss.backward()
            optimizer.step(), scheduler.step(), tuned.step(optimizer), optimizer.zero_grad()

    def start():
        tuned = losia_cli.prepare(tiny_model(tiny_llama_dir), "losia_pro", total_steps=4, period=1)
        optimizer = tuned.optimizer(lr=1e-2)
        return tuned, optimizer, tuned.scheduler(optimizer, warmup_ratio=0.25)

    straight = start()
    run(*straight, 4)
    first = start()
    run(*first, 2)
    saved = [first[0].model.state_dict(), first[1].state_dict(), first[2].state_dict(), first[0].state_dict()]
    resumed = start()
    resumed[0].model.load_state_dict(saved[0])
    resumed[1].load_state_dict(saved[1])
    resumed[2].load_state_dict(saved[2])
    resumed[0].load_state_dict(saved[3])
    run(*resumed, 2)
    a, b = straight[0].merged().state_dict(), resumed[0].merged().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_pretrained_is_a_plain_transformers_dir(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    tuned = losia_cli.prepare(tiny_model(tiny_llama_dir), "lora", total_steps=1, rank=4)
    with torch.no_grad():
        for name, p in tuned.model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a non-zero adapter, so that folding it shows
        tokens = torch.arange(8)[None]
        expected = tuned.model(tokens).logits
    tuned.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        # merge_and_unload folds BA into W in fp32: the same sum in another order (float rounding).
        torch.testing.assert_close(reloaded(tokens).logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="exists already"):
        tuned.save_pretrained(tmp_path / "out")
