"""Preference objectives: our DPO and SimPO losses against TRL's own implementation on the same
log-probs, and preference training end to end on the tiny Llama."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from losia_cli.errors import ConfigError
from losia_cli.data import DataConfig, build_dataset, make_collator, render_samples
from losia_cli.errors import DataError
from losia_cli.workflow import train

from losia_cli.engine import preference
from losia_cli.engine.preference import dpo_loss, sequence_logps

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")

# The same arithmetic in fp64 in another association order (beta*a - beta*b against beta*(a - b)):
# the results differ by rounding, a few ulps of values of order 1-10, far below 1e-12.
ATOL = 1e-12


def _batch(seed=0, pairs=3, width=7, vocab=11):
    """Logits and labels of 2*pairs rows (chosen then rejected), prompt tokens masked with -100."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * pairs, width, vocab, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (2 * pairs, width), generator=g)
    for row in range(2 * pairs):  # a prompt of 1-3 tokens, then the completion to the end
        labels[row, : 1 + row % 3] = -100
    return logits, labels


def _trl_dpo(logits, labels, ref, beta):
    """TRL's DPOTrainer._compute_loss (loss_type=sigmoid, precomputed reference) on our log-probs."""
    shifted = labels[:, 1:]
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, shifted.clamp(min=0)[..., None])[..., 0]
    mask = shifted != -100
    outputs = SimpleNamespace(log_probs=token_logps * mask, entropy=torch.zeros_like(token_logps),
                              mean_logits=torch.zeros_like(token_logps), is_top1=torch.zeros_like(mask))
    accelerator = SimpleNamespace(device=logits.device, gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        beta=beta, use_weighting=False, label_smoothing=0.0, _total_train_tokens=0, _tp_size=1,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    completion = torch.cat([torch.zeros_like(mask[:, :1]), mask], 1).long()
    inputs = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones_like(labels),
              "completion_mask": completion, "ref_chosen_logps": ref.chunk(2)[0], "ref_rejected_logps": ref.chunk(2)[1]}
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def _trl_cpo(loss_type, chosen, rejected, beta, gamma=0.5, label_smoothing=0.0):
    """TRL's CPOTrainer.cpo_loss (loss_type sigmoid: the conservative-DPO formula; simpo)."""
    trainer = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing,
                              loss_type=loss_type, accelerator=SimpleNamespace(device=chosen.device))
    return trl_cpo.CPOTrainer.cpo_loss(trainer, chosen, rejected)


def test_sequence_logps_match_trl():
    logits, labels = _batch()
    ours, counts = sequence_logps(logits, labels)
    torch.testing.assert_close(ours, trl_cpo.CPOTrainer.get_batch_logps(logits, labels), rtol=0, atol=ATOL)
    torch.testing.assert_close(ours / counts, trl_cpo.CPOTrainer.get_batch_logps(logits, labels, True),
                               rtol=0, atol=ATOL)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl_dpo_trainer(beta):
    logits, labels = _batch(1)
    ref = torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5 - 20
    objective = preference.Objective("dpo", beta, 0.0, 0.0)
    losses, chosen, rejected = objective.pair_terms(logits, labels, ref)
    trl_loss, metrics = _trl_dpo(logits, labels, ref, beta)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=0, atol=ATOL)
    ours = preference.pair_metrics(preference.pair_sums(chosen, rejected).tolist())
    assert ours["rewards_chosen"] == pytest.approx(metrics["rewards/chosen"][0], abs=ATOL)
    assert ours["rewards_rejected"] == pytest.approx(metrics["rewards/rejected"][0], abs=ATOL)
    assert ours["reward_margin"] == pytest.approx(metrics["rewards/margins"][0], abs=ATOL)
    # TRL means the 0/1 accuracies in fp32 (.float()): 2/3 there is 2/3 to fp32's 6e-8.
    assert ours["pref_accuracy"] == pytest.approx(metrics["rewards/accuracies"][0], abs=1e-7)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_label_smoothing_matches_trl_cdpo(label_smoothing):
    """TRL's DPO sigmoid has no label smoothing since 1.x; its CPO sigmoid keeps the conservative-DPO
    expression in the policy's log-ratio, which DPO's is with the reference subtracted."""
    g = torch.Generator().manual_seed(3)
    chosen, rejected, ref_c, ref_r = (torch.randn(5, generator=g, dtype=torch.float64) * 4 - 30 for _ in range(4))
    ours, oc, orj = dpo_loss(chosen, rejected, ref_c, ref_r, 0.1, label_smoothing)
    theirs, tc, tr = _trl_cpo("sigmoid", chosen - ref_c, rejected - ref_r, 0.1, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    torch.testing.assert_close(oc, tc, rtol=0, atol=ATOL)


@pytest.mark.parametrize("beta, gamma, label_smoothing", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.1)])
def test_simpo_matches_trl_cpo_trainer(beta, gamma, label_smoothing):
    logits, labels = _batch(4)
    objective = preference.Objective("simpo", beta, label_smoothing, gamma)
    losses, chosen, rejected = objective.pair_terms(logits, labels)
    avg = trl_cpo.CPOTrainer.get_batch_logps(logits, labels, True)
    theirs, tc, tr = _trl_cpo("simpo", *avg.chunk(2), beta, gamma, label_smoothing)
    torch.testing.assert_close(losses, theirs, rtol=0, atol=ATOL)
    torch.testing.assert_close(chosen, tc, rtol=0, atol=ATOL)
    torch.testing.assert_close(rejected, tr, rtol=0, atol=ATOL)


# -- data ----------------------------------------------------------------------------------------

def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_string_pairs_mask_the_prompt_on_both_sides(tok):
    data = build_dataset(DataConfig(task="preference", source="bundled:preference_sample"), tok, cache_dir=None)
    example = data[0]
    assert data.pairs and len(data) == 48
    for ids, labels in ((example["input_ids"], example["labels"]),
                        (example["rejected_input_ids"], example["rejected_labels"])):
        first = next(i for i, label in enumerate(labels) if label != -100)
        assert tok.decode(ids[:first]) == "Q: What is 59 + 55?\nA:"  # the prompt carries no loss
        assert labels[first:] == ids[first:]  # the completion and EOS do
    batch = make_collator(DataConfig(task="preference", source="bundled:preference_sample"), tok)([data[0], data[1]])
    assert batch["input_ids"].shape[0] == 4 and torch.equal(batch["labels"][0, :len(example["labels"])],
                                                          torch.tensor(example["labels"]))


def test_message_pairs_share_the_prompt_in_the_chat_template(tok):
    cfg = DataConfig(task="preference_messages", source="bundled:preference_messages_sample")
    shown = str(render_samples(cfg, tok, n=1)[0])
    assert "row 0 chosen" in shown and "row 0 rejected" in shown
    assert "⟦59 + 55 = 114.<|im_end|>⟧" in shown and "⟦59 + 55 = 116.<|im_end|>⟧" in shown
    assert shown.count("<|im_start|>assistant\n⟦") == 2  # the generation prompt is the masked prefix


def test_column_map_renames_pair_columns(tok, tmp_path):
    source = _jsonl(tmp_path / "p.jsonl", [{"question": "1+1=", "good": "2", "bad": "3"}] * 2)
    cfg = DataConfig(task="preference", source=source, column_map={"question": "prompt", "good": "chosen", "bad": "rejected"})
    assert len(build_dataset(cfg, tok, cache_dir=None)) == 2


@pytest.mark.parametrize("row, message", [
    ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "chosen and rejected are identical"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": None}, "column 'rejected' is missing or null"),
])
def test_bad_pairs_name_file_and_line(tok, tmp_path, row, message):
    source = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, row])
    with pytest.raises(DataError, match=f"p.jsonl:2: .*{message}"):
        build_dataset(DataConfig(task="preference", source=source), tok, cache_dir=None)


def test_conversations_must_share_a_prefix(tok, tmp_path):
    def talk(user, reply):
        return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    source = _jsonl(tmp_path / "m.jsonl", [{"chosen": talk("2+2?", "4"), "rejected": talk("2+2?", "5")},
                                           {"chosen": talk("2+2?", "4"), "rejected": talk("3+3?", "5")}])
    with pytest.raises(DataError, match="m.jsonl:2: .*must share the conversation up to an assistant turn"):
        build_dataset(DataConfig(task="preference_messages", source=source), tok, cache_dir=None)


# -- config and engine ---------------------------------------------------------------------------
PAIRS = ("data=preference_sample", "data.val_split=0.25")


@pytest.mark.parametrize("overrides, message", [
    (("train.objective=dpo",), "train.objective=dpo trains on preference pairs"),
    ((*PAIRS,), "train.objective=sft does not train on the preference pairs"),
])
def test_objective_and_data_must_agree(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(tiny_config("x", "method=full", *overrides))


@pytest.mark.parametrize("overrides, message", [
    (("train.objective=dpo", "train.simpo_gamma=1.0"), "train.simpo_gamma does not apply to train.objective=dpo"),
    (("train.objective=simpo", "data.packing=true"), "data.packing: train.objective=simpo"),
    (("train.objective=ipo",), "train.objective: Input should be 'sft', 'dpo' or 'simpo'"),
])
def test_objective_knobs_are_checked(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("x", *PAIRS, *overrides)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["losia_pro", "losia", "lora", "dora", "pissa", "galore", "full"])
def test_every_method_trains_with_dpo(tiny_config, method):
    run_dir = train(tiny_config(f"dpo-{method}", f"method={method}", *PAIRS, "train.objective=dpo",
                                "train.max_steps=2", "train.eval_every=2"))
    rows = _metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "pref_accuracy"} <= steps[0].keys()
    # Step 1 runs with the starting weights: policy == reference, every reward 0 and the loss log 2.
    assert steps[0]["rewards_chosen"] == 0 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    val = [r for r in rows if "val_loss" in r][-1]
    assert {"val_pref_accuracy", "val_reward_margin"} <= val.keys()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["objective"] == "dpo" and report["reference"]["seconds"] >= 0
    assert "**objective**: dpo (beta=0.1" in (run_dir / "final" / "README.md").read_text()


def test_simpo_trains_without_a_reference(tiny_config, monkeypatch):
    monkeypatch.setattr(preference, "reference_logps", None)  # never called
    run_dir = train(tiny_config("simpo", "method=lora", *PAIRS, "train.objective=simpo", "train.beta=2.0",
                                "train.max_steps=2"))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["objective"] == "simpo" and report["reference"] is None


def test_dpo_resume_is_bit_exact_and_reuses_the_reference(tiny_config, tmp_path, monkeypatch):
    common = ("method=losia_pro", *PAIRS, "train.objective=dpo", "train.max_steps=5", "train.save_every=2")
    straight = train(tiny_config("straight", *common))

    real, calls = preference.Objective.loss_sum, {"n": 0}

    def crash_on_fourth(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return real(self, *args)

    monkeypatch.setattr(preference.Objective, "loss_sum", crash_on_fourth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config("resumed", *common))
    monkeypatch.setattr(preference.Objective, "loss_sum", real)

    def recomputed(*args, **kwargs):
        raise AssertionError("the reference log-probs were recomputed on resume")

    monkeypatch.setattr(preference, "reference_logps", recomputed)
    resumed = train(tiny_config("resumed", *common, "run.resume=auto"))
    a, b = (load_file(str(next((d / "final").glob("*.safetensors")))) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(straight) if "loss" in r] == [r["loss"] for r in _metrics(resumed) if "loss" in r]
    assert json.loads((resumed / "report.json").read_text())["reference"]["computed"] is False


def _arithmetic_pairs(path, n, seed):
    """n pairs: chosen = the right sum or product, rejected = one off by a small amount."""
    import random

    rng, rows = random.Random(seed), []
    for i in range(n):
        a, b = rng.randint(11, 49), rng.randint(11, 49)
        sym, right = ("+", a + b) if i % 2 else ("*", a * b)
        wrong = right + rng.choice([-10, -2, -1, 1, 2, 10])
        rows.append({"prompt": f"Q: What is {a} {sym} {b}?\nA:", "chosen": f" {right}", "rejected": f" {wrong}"})
    return _jsonl(path, rows)


@pytest.mark.slow
@pytest.mark.parametrize("method, lr", [("losia_pro", "5e-4"), ("lora", "2e-3")])
def test_dpo_raises_held_out_preference_accuracy(tmp_path, method, lr):
    """On SmolLM2-135M, DPO on 64 generated pairs lifts the share of 32 held-out pairs whose chosen
    side the policy finds more likely (log-prob margin > 0) by at least 0.15 over the starting model."""
    from losia_cli.compose import load_config
    from losia_cli.models import load_model

    source = _arithmetic_pairs(tmp_path / "pairs.jsonl", 96, seed=7)
    cfg = load_config(["recipe=smollm2_135m_dpo", f"method={method}", f"data.source={source}",
                       "data.val_split=0.3333", f"train.lr={lr}", "train.max_steps=16", "train.eval_every=16",
                       f"run.output_dir={tmp_path}", "run.name=dpo"])
    run_dir = train(cfg)
    report = json.loads((run_dir / "report.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    val = build_dataset(cfg.data, tokenizer, cache_dir=None, split="val")
    collate = make_collator(cfg.data, tokenizer)
    before = preference.reference_logps(load_model(cfg.model, str(cfg_model_path(cfg))), val, collate, 8,
                                        torch.autocast("cpu", enabled=False))
    trained = _trained_model(run_dir, cfg)
    after = preference.reference_logps(trained, val, collate, 8, torch.autocast("cpu", enabled=False))
    acc_before, acc_after = (float((x[:, 0] > x[:, 1]).mean()) for x in (before, after))
    print(f"{method}: held-out preference accuracy {acc_before:.3f} -> {acc_after:.3f}; "
          f"reference pass {report['reference']['seconds']:.1f} s")
    assert acc_after >= acc_before + 0.15


def cfg_model_path(cfg):
    from losia_cli.models import resolve_model_path

    return resolve_model_path(cfg.model)


def _trained_model(run_dir, cfg):
    """final/ as a plain model: a full HF dir, or a PEFT adapter on the base."""
    from transformers import AutoModelForCausalLM

    final = run_dir / "final"
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(cfg_model_path(cfg))
        return PeftModel.from_pretrained(base, final).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(final)


def test_eval_scores_pairs_by_log_prob_margin(tiny_llama_dir, tmp_path):
    """`losia eval RUN tasks=[preference@FILE]`: a pair is a two-option question, chosen gold."""
    from losia_cli.eval.command import load_rows
    from losia_cli.eval.loglik import loglikelihoods
    from losia_cli.eval.runner import evaluate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)
    name, rows = load_rows("preference@bundled:preference_sample", limit=6)
    result = evaluate(model, tokenizer, name, rows)
    pairs = [(row["prompt"], side) for row in rows for side in (row["chosen"], row["rejected"])]
    scores = loglikelihoods(model, tokenizer, pairs)
    margins = [scores[i] - scores[i + 1] for i in range(0, len(scores), 2)]
    assert result["metrics"]["acc"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))


@pytest.mark.slow
def test_ddp_dpo_matches_one_process(tiny_llama_dir, tmp_path):
    """DPO under DDP (2 gloo processes x 2 pairs) trains what one process does with 4 pairs: the pair
    loss is a mean over the step's pairs on every rank count. fp64, so only summation order differs."""
    import subprocess
    import sys

    from test_losia_support import FP64_ATOL

    args = [f"model.name_or_path={tiny_llama_dir}", "model.dtype=fp64", "data=preference_sample",
            "data.max_length=64", "train.objective=dpo", "train.max_steps=3", "method=losia_pro",
            "method.period=2", f"run.output_dir={tmp_path}"]
    runs = {"single": ["train.micro_batch_size=4"],
            "ddp": ["dist=ddp", "dist.num_processes=2", "train.micro_batch_size=2"]}
    for name, extra in runs.items():
        proc = subprocess.run([sys.executable, "-m", "losia_cli.cli", "train", *args, *extra, f"run.name={name}"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    single, ddp = (load_file(str(next((tmp_path / n / "final").glob("*.safetensors")))) for n in runs)
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=FP64_ATOL, msg=key)
    rows = {n: [r for r in _metrics(tmp_path / n) if "loss" in r] for n in runs}
    assert [r["pref_accuracy"] for r in rows["ddp"]] == [r["pref_accuracy"] for r in rows["single"]]
