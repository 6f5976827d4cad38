"""`losia eval` from the command line, and `eval.after_train` at the end of `losia train`."""

from __future__ import annotations

import json

import pytest
import torch

from losia_cli.cli import main
from losia_cli.workflow import train


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def perturbed_copy(model_dir, out):
    """The model with its final norm scaled: a baseline that scores differently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_eval_writes_results_and_samples(capsys, tiny_llama_dir, tmp_path):
    baseline = perturbed_copy(tiny_llama_dir, tmp_path / "baseline")
    code, out, err = run(
        capsys, "eval", str(tiny_llama_dir), "tasks=[gsm8k@bundled:gsm8k_sample,boolq@bundled:boolq_sample]",
        "limit=3", "max_new_tokens=4", "--baseline", str(baseline), "--out", str(tmp_path / "ev"),
    )
    assert code == 0, err
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(results["tasks"]) == {"gsm8k", "boolq"}
    assert results["tasks"]["gsm8k"]["n"] == 3 and "exact_match" in results["tasks"]["gsm8k"]["metrics"]
    boolq = results["tasks"]["boolq"]
    assert {"acc", "acc_norm"} <= boolq["metrics"].keys()
    # Each delta is the model's metric minus the baseline's, and the forgetting delta the loss gap.
    for metric, delta in boolq["delta_vs_baseline"].items():
        assert delta == pytest.approx(boolq["metrics"][metric] - boolq["baseline_metrics"][metric])
    config = results["config"]
    gap = config["general_text_loss"]["loss"] - config["general_text_loss_baseline"]["loss"]
    assert config["forgetting_delta"] == pytest.approx(gap) and abs(gap) > 1e-3
    samples = (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()
    assert len(samples) >= 3 and "Δ" in out


@pytest.mark.parametrize(
    "options, message",
    [
        (["tasks=[nope]"], "nope"),
        (["tasks=[gsm8k@/no/such.jsonl]"], "/no/such.jsonl"),
        (["tasks=[humaneval]"], "allow_code_exec=true"),
        (["limit=zero"], "limit"),
    ],
)
def test_eval_bad_input(capsys, tiny_llama_dir, tmp_path, options, message):
    code, _, err = run(capsys, "eval", str(tiny_llama_dir), *options, "--out", str(tmp_path / "ev"))
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "ev").exists()


def test_model_dir_without_tokenizer_is_refused(capsys, tiny_llama_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_llama_dir / name).read_bytes())
    code, _, err = run(capsys, "eval", str(bare), "tasks=[boolq@bundled:boolq_sample]")
    assert code == 2 and "tokenizer" in err


def test_eval_after_train(tiny_config):
    run_dir = train(tiny_config(
        "evald", "method=losia_pro", "method.period=1", "train.max_steps=2", "eval.after_train=true",
        "eval.tasks=[boolq@bundled:boolq_sample]", "eval.limit=2",
    ))
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["tasks"]["boolq"]["n"] == 2
    assert results["model"]["run_dir"] == str(run_dir)


def test_code_eval_through_the_chat_template(capsys, tiny_llama_dir, tmp_path):
    code, _, err = run(
        capsys, "eval", str(tiny_llama_dir), "tasks=[humaneval]", "allow_code_exec=true", "chat=true",
        "limit=2", "max_new_tokens=4", "forgetting=false", "--out", str(tmp_path / "ev"),
    )
    assert code == 0, err
    result = json.loads((tmp_path / "ev" / "results.json").read_text())["tasks"]["humaneval"]
    assert result["config"]["chat"] is True and result["n"] == 2 and "pass@1" in result["metrics"]
    samples = [json.loads(line) for line in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert all(s["output"].startswith("from typing import List") or "def " in s["output"] for s in samples)


def test_code_eval_refused_without_the_sandbox_unless_unsafe(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    from losia_cli.eval import sandbox

    monkeypatch.setattr(sandbox, "sandbox_unavailable", lambda: "unshare: Operation not permitted")
    args = ["eval", str(tiny_llama_dir), "tasks=[humaneval]", "limit=1", "max_new_tokens=4", "forgetting=false"]
    code, _, err = run(capsys, *args, "allow_code_exec=true", "--out", str(tmp_path / "refused"))
    assert code == 2 and "allow_code_exec=unsafe" in err and "Operation not permitted" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "refused").exists()
    code, _, err = run(capsys, *args, "allow_code_exec=unsafe", "--out", str(tmp_path / "ev"))
    assert code == 0, err
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["config"]["allow_code_exec"] == "unsafe"
