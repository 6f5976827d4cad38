"""Scoring, generation, forgetting probe, results files and `evaluate` on a tiny in-code Llama with
SmolLM2's real tokenizer."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from losia_cli.eval.command import load_rows
from losia_cli.eval.forgetting import forgetting_delta, general_text_loss
from losia_cli.eval.generate import generate, generate_samples
from losia_cli.eval.loglik import encode_pair, loglikelihoods, score_multiple_choice
from losia_cli.eval.results import results_table, write_results
from losia_cli.eval.runner import evaluate
from losia_cli.eval.sandbox import CodeExecutionNotAllowed


@pytest.fixture(scope="module")
def tiny(smollm2_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


MC_ITEMS = [
    {"context": "Question: What color is the sky?\nAnswer:", "continuations": [" blue", " green", " a large red"], "gold": 0},
    {"contexts": ["The cat sat on the ", "The cat sat on the "], "continuations": ["mat", "moon landing site"], "gold": 1},
    {"context": "2 + 2 =", "continuations": [" 4", " 5", " 22", " four"], "gold": 3},
    {"context": "", "continuations": ["Hello", "Goodbye"], "gold": 0},
]


def by_hand(model, tokenizer, context, continuation):
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ctx = ctx or [tokenizer.bos_token_id]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(ctx) - 1 + j, tok].item() for j, tok in enumerate(cont))


def test_encode_pair_moves_trailing_space(tiny):
    _, tokenizer = tiny
    ctx, cont = encode_pair(tokenizer, "The cat sat on the ", "mat")
    assert tokenizer.decode(ctx) == "The cat sat on the" and tokenizer.decode(cont) == " mat"


def test_multiple_choice_matches_by_hand(tiny):
    model, tokenizer = tiny
    result = score_multiple_choice(model, tokenizer, MC_ITEMS, batch_size=3)
    acc, acc_norm = [], []
    for item, sample in zip(MC_ITEMS, result["samples"]):
        contexts = item.get("contexts") or [item["context"]] * len(item["continuations"])
        ll = [by_hand(model, tokenizer, c, o) for c, o in zip(contexts, item["continuations"])]
        assert sample["loglik"] == pytest.approx(ll, abs=1e-4)
        norm = [v / len(o) for v, o in zip(ll, item["continuations"])]
        acc.append(float(max(range(len(ll)), key=ll.__getitem__) == item["gold"]))
        acc_norm.append(float(max(range(len(ll)), key=norm.__getitem__) == item["gold"]))
    n = len(MC_ITEMS)
    assert result["metrics"] == {"acc": sum(acc) / n, "acc_norm": sum(acc_norm) / n}
    for name, values in (("acc", acc), ("acc_norm", acc_norm)):
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        assert result["stderr"][name] == pytest.approx(std / math.sqrt(n))
    assert result["n"] == n


def test_loglik_batching_invariant(tiny):
    model, tokenizer = tiny
    requests = [("a b c d e f g", " h"), ("x", " y z"), ("Question: why?\nAnswer:", " because")]
    assert loglikelihoods(model, tokenizer, requests, batch_size=3) == pytest.approx(
        loglikelihoods(model, tokenizer, requests, batch_size=1), abs=1e-4)


PROMPTS = ["Hello there, how are", "def add(a, b):\n    return", "1 2 3 4 5 6 7 8 9 10 11 12 13", "a"]


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4)
    single = [generate(model, tokenizer, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == single and all(batched)
    assert tokenizer.padding_side == "right"  # restored after generation


def test_stop_strings_and_sampling(tiny):
    model, tokenizer = tiny
    full = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=12)[0]
    word = full.split()[1]
    stopped = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=12, stop=[word])[0]
    assert stopped == full[: full.find(word)]
    samples = generate_samples(model, tokenizer, PROMPTS[:2], num_samples=3, do_sample=True, max_new_tokens=4,
                               temperature=1.0, top_p=0.9, seed=1)
    assert [len(s) for s in samples] == [3, 3]
    again = generate_samples(model, tokenizer, PROMPTS[:2], num_samples=3, do_sample=True, max_new_tokens=4,
                             temperature=1.0, top_p=0.9, seed=1)
    assert samples == again
    with pytest.raises(ValueError):
        generate_samples(model, tokenizer, PROMPTS, num_samples=2)


def test_forgetting_probe(tiny, tmp_path):
    model, tokenizer = tiny
    before = general_text_loss(model, tokenizer)
    assert 100 < before["tokens"] < 1000 and math.isfinite(before["loss"])
    assert before["loss"] == pytest.approx(math.log(len(tokenizer)), rel=0.1)  # random init ~ uniform
    path = tmp_path / "general.txt"
    path.write_text("One paragraph here.\n\nAnother one there.\n")
    assert general_text_loss(model, tokenizer, path=path)["texts"] == 2
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)
    try:
        after = general_text_loss(model, tokenizer)
    finally:
        with torch.no_grad():
            model.model.norm.weight.div_(3.0)
    assert forgetting_delta(before, after) == pytest.approx(after["loss"] - before["loss"])


def test_evaluate_and_results_files(tiny, tmp_path):
    model, tokenizer = tiny
    mc_rows = [{"kind": "multiple_choice", **item} for item in MC_ITEMS]
    gen_rows = [{"kind": "generate", "prompt": "Q: 1+1?\nA:", "reference": "2"},
                {"kind": "generate", "prompt": "Q: 2+2?\nA:", "reference": "4"}]
    humaneval = load_rows("humaneval", 2)[1]
    results = {
        "mc": evaluate(model, tokenizer, "mc", mc_rows, batch_size=4),
        "gen": evaluate(model, tokenizer, "gen", gen_rows, max_new_tokens=5),
        "humaneval": evaluate(model, tokenizer, "humaneval", humaneval, max_new_tokens=5, allow_code_exec=True),
    }
    assert results["mc"]["metrics"].keys() == {"acc", "acc_norm"}
    assert results["gen"]["n"] == 2 and "extracted" in results["gen"]["samples"][0]
    assert results["humaneval"]["metrics"]["pass@1"] == 0.0 and results["humaneval"]["n"] == 2
    with pytest.raises(CodeExecutionNotAllowed, match="allow_code_exec=true"):
        evaluate(model, tokenizer, "humaneval", humaneval[:1])
    path = write_results(tmp_path / "eval", results, model={"name_or_path": "tiny"}, config={"tasks": list(results)})
    data = json.loads(path.read_text())
    assert data["tasks"]["mc"]["metrics"] == results["mc"]["metrics"] and "torch" in data["versions"]
    lines = (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 + 2 + 2 and {json.loads(line)["task"] for line in lines} == set(results)
    assert not list((tmp_path / "eval").glob(".*tmp"))
    assert results_table(results).row_count == 2 + 1 + 1


def test_gsm8k_scores_a_correct_generation(tiny, monkeypatch):
    """A generation that ends in the gold answer counts; a wrong one does not (raw GSM8K rows, rendered
    by the task, reference taken from '#### N')."""
    from losia_cli.eval import runner

    model, tokenizer = tiny
    sample = Path(__file__).parents[1] / "data_templates" / "samples" / "gsm8k_sample.jsonl"
    rows = [json.loads(line) for line in sample.read_text().splitlines()][:3]
    outputs = [["15 * 4 = 60 a week, 60 * 4 = 240.\n#### 240"], ["The answer is 161."], ["Together: $90.00"]]
    monkeypatch.setattr(runner, "generate_samples", lambda *args, **kwargs: outputs)
    result = evaluate(model, tokenizer, "gsm8k", rows)
    assert [s["reference"] for s in result["samples"]] == ["240", "160", "90"]
    assert [s["correct"] for s in result["samples"]] == [True, False, True]
    assert result["metrics"]["exact_match"] == pytest.approx(2 / 3)
