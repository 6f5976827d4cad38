"""`losia eval ... backend=lm_eval`: a local harness task scored on the loaded model, in our results shape."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from losia_cli.cli import main
from losia_cli.eval.loglik import loglikelihoods

from conftest import REPO

pytest.importorskip("lm_eval")
TASKS = REPO / "tests" / "fixtures" / "lm_eval"


def _eval(tmp_path, target, *options):
    out = tmp_path / "ev"
    argv = ["eval", str(target), "backend=lm_eval", "tasks=[losia_arith]", f"include_path={TASKS}",
            "forgetting=false", *options, "--out", str(out)]
    return main(argv), out


def _our_scores(model_dir):
    """Per-question log-likelihoods of each choice and the accuracy, from our own scorer."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = [json.loads(line) for line in (TASKS / "arith.jsonl").read_text().splitlines()]
    scores = [loglikelihoods(model, tokenizer, [(f"Question: {d['question']}\nAnswer:", f" {c}")
                                                for c in d["choices"]]) for d in docs]
    acc = sum(max(range(len(s)), key=s.__getitem__) == d["label"] for s, d in zip(scores, docs)) / len(docs)
    return scores, acc


def _check(out, model_dir):
    results = json.loads((out / "results.json").read_text())
    task = results["tasks"]["losia_arith"]
    assert task["n"] == 10 and set(task["metrics"]) == {"acc"} and task["stderr"]["acc"] > 0
    assert results["config"]["backend"] == "lm_eval" and results["config"]["harness_version"]
    assert task["harness_task_config"]["output_type"] == "multiple_choice"
    # The harness scored our model: its log-likelihoods are the ones our scorer gets from it.
    scores, acc = _our_scores(model_dir)
    harness = [[resp[0] for resp in json.loads(line)["filtered_resps"]]
               for line in (out / "samples.jsonl").read_text().splitlines()]
    assert torch.allclose(torch.tensor(harness), torch.tensor(scores), atol=1e-3)
    assert task["metrics"]["acc"] == acc
    return acc


def test_local_task_on_a_tiny_model(monkeypatch, tiny_llama_dir, tmp_path):
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repo root
    code, out = _eval(tmp_path, tiny_llama_dir)
    assert code == 0
    _check(out, tiny_llama_dir)


@pytest.mark.parametrize("options, message", [
    (["tasks=[no_such_task]"], "unknown harness task 'no_such_task'"),
    (["--baseline", "no/such/model"], "native backend only"),  # refused before anything loads
])
def test_bad_lm_eval_requests(capsys, monkeypatch, tiny_llama_dir, tmp_path, options, message):
    monkeypatch.chdir(REPO)
    code, out = _eval(tmp_path, tiny_llama_dir, *options)
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_local_task_on_packaged_smollm2(monkeypatch, smollm2_dir, tmp_path):
    monkeypatch.chdir(REPO)
    code, out = _eval(tmp_path, "package:smollm2-135m")
    assert code == 0
    assert _check(out, smollm2_dir) > 0.25  # better than chance on 4-way arithmetic
