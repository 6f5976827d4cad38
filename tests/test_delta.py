"""Deltas (losia_cli/delta.py): base + delta == final bit for bit, the size bound for LoSiA's blocks,
every refusal one line with nothing written or changed, and LoRA extraction loaded by PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from losia_cli import apply_delta
from losia_cli.cli import main
from losia_cli.delta import CONFIG, WEIGHTS, DeltaError, export_delta, parameters, trained_blocks, _union
from losia_cli.workflow import train


def _load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


@pytest.fixture(scope="module", params=["losia_pro", "losia"])
def pro_run(request, tmp_path_factory, tiny_llama_dir):
    """A LoSiA-Pro (then a plain LoSiA) run that re-localizes often (several blocks per matrix)."""
    from losia_cli.compose import load_config

    out = tmp_path_factory.mktemp("runs")
    return train(load_config([
        f"model.name_or_path={tiny_llama_dir}", "data.max_length=64", "train.micro_batch_size=4",
        "train.max_steps=8", "train.warmup_ratio=0", f"run.output_dir={out}", "run.name=pro",
        f"method={request.param}", "method.period=1", "method.rank_factor=0.25",
    ]))


@pytest.fixture(scope="module")
def pro_delta(pro_run):
    out = pro_run / "delta"
    export_delta(pro_run, out)
    return out


def test_base_plus_delta_is_final_bit_for_bit(pro_run, pro_delta, tiny_llama_dir):
    model = apply_delta(_load(tiny_llama_dir), pro_delta)
    final = parameters(_load(pro_run / "final"))
    for name, value in parameters(model).items():
        assert torch.equal(value, final[name]), name


def test_a_delta_dir_is_a_target_for_chat_eval_and_gguf(pro_run, pro_delta):
    from losia_cli.eval.command import load_target

    model = load_target(str(pro_delta))[0]
    final = parameters(_load(pro_run / "final"))
    assert all(torch.equal(v, final[k]) for k, v in parameters(model).items())


def test_blocks_cost_at_most_a_quarter_more_than_their_values(pro_run, pro_delta, tiny_llama_dir):
    blocks = trained_blocks(pro_run)
    assert min(len({json.dumps(b) for b in v}) for v in blocks.values()) >= 3  # several re-localizations
    shapes = {k: v.shape for k, v in parameters(_load(tiny_llama_dir)).items()}
    inside = sum(int(_union(shapes[name], b).sum()) for name, b in blocks.items()) * 4  # fp32 values
    size = (pro_delta / WEIGHTS).stat().st_size
    assert size <= 1.25 * inside, (size, inside)


def test_a_delta_applied_twice_is_refused(pro_delta, tiny_llama_dir):
    model = apply_delta(_load(tiny_llama_dir), pro_delta)
    with pytest.raises(DeltaError, match="applied to the model already"):
        apply_delta(model, pro_delta)


def _refused(args, capsys, match):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_merge_refuses_a_wrong_base_a_damaged_delta_another_architecture(pro_delta, tiny_llama_dir, tmp_path, capsys):
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = {k: getattr(LlamaConfig.from_pretrained(tiny_llama_dir), k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "tie_word_embeddings")}
    torch.manual_seed(1)
    other = tmp_path / "other-seed"  # same shapes, other weights
    LlamaForCausalLM(LlamaConfig(**small)).save_pretrained(other)
    narrow = tmp_path / "narrow"  # same architecture, other shapes
    LlamaForCausalLM(LlamaConfig(**{**small, "intermediate_size": 96})).save_pretrained(narrow)
    qwen = tmp_path / "qwen"  # another architecture, same shapes
    Qwen2ForCausalLM(Qwen2Config(**small)).save_pretrained(qwen)
    for base in (other, narrow, qwen):
        shutil.copy(tiny_llama_dir / "tokenizer.json", base)
        shutil.copy(tiny_llama_dir / "tokenizer_config.json", base)
    out = tmp_path / "merged"
    merge = ["merge", "--delta", str(pro_delta), "--out", str(out), "--base"]
    _refused([*merge, str(other)], capsys, "made for another base")
    _refused([*merge, str(narrow)], capsys, "is [128, 64] in the delta's base, [96, 64] here")
    _refused([*merge, str(qwen)], capsys, "a delta for a llama model, this one is qwen2")
    damaged = tmp_path / "damaged"
    shutil.copytree(pro_delta, damaged)
    data = (damaged / WEIGHTS).read_bytes()
    (damaged / WEIGHTS).write_bytes(data[: len(data) // 2])
    _refused([*merge[:2], str(damaged), *merge[3:], str(tiny_llama_dir)], capsys, "truncated or damaged")
    assert not out.exists() and not any(p.name.startswith(".merged") for p in tmp_path.iterdir())
    assert main([*merge, str(tiny_llama_dir)]) == 0
    assert json.loads((out / "MANIFEST.json").read_text())["verified"]["logits_equal"]


def test_exact_lora_extraction_loads_in_peft_and_replies_as_the_merged_model(pro_run, tiny_llama_dir, tmp_path):
    from peft import PeftModel

    from losia_cli.delta import export_lora

    report = export_lora(pro_run, tmp_path / "lora")
    assert max(m["relative_frobenius_error"] for m in report["matrices"].values()) < 1e-6
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    adapted = PeftModel.from_pretrained(_load(tiny_llama_dir), tmp_path / "lora").eval()
    merged = _load(pro_run / "final").eval()
    prompt = torch.tensor([[1, 17, 523, 99, 4051, 7]])
    with torch.no_grad():
        want, got = merged(prompt).logits, adapted(prompt).logits
        greedy = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(adapted.generate(prompt, **greedy), merged.generate(prompt, **greedy))
    # PEFT adds x A^T B^T to x W^T instead of using W + B A: the two sums round differently. Each fp32
    # op is off by at most eps (1.2e-7) relative; through 2 layers of sums of <= 128 terms the logits
    # stay within 128 * eps of their own magnitude (measured: ~1e-6 relative).
    tolerance = 128 * torch.finfo(torch.float32).eps * want.abs().max()
    assert (got - want).abs().max() <= tolerance
    low = export_lora(pro_run, tmp_path / "r1", rank=1)["matrices"]
    assert {m["rank"] for m in low.values()} == {1} and all(0 < m["relative_frobenius_error"] < 1 for m in low.values())
    energy = export_lora(pro_run, tmp_path / "e", energy=0.5)["matrices"]
    assert all(m["rank"] <= report["matrices"][k]["rank"] for k, m in energy.items())


def test_adapter_runs_are_refused(tiny_config, capsys):
    run_dir = train(tiny_config("lora", "method=lora", "train.max_steps=1"))
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "lora"]) == 2
    assert "ships an adapter already" in capsys.readouterr().err


def test_run_final_both_and_delta_only(tiny_config, tiny_llama_dir, capsys):
    """run.final=both: final/ holds the weights and their delta (dense: full fine-tuning changes every
    weight); with the weights removed (run.final=delta's final/), merge/chat/eval load base + delta."""
    from losia_cli.runmodel import load_run_model

    run_dir = train(tiny_config("both", "method=full", "train.max_steps=2", "run.final=both"))
    final = run_dir / "final"
    full = parameters(_load(final))
    via_delta = parameters(apply_delta(_load(tiny_llama_dir), final))
    assert all(torch.equal(via_delta[k], v) for k, v in full.items())
    (final / "model.safetensors").unlink()
    loaded = parameters(load_run_model(run_dir)[0])
    assert all(torch.equal(loaded[k], v) for k, v in full.items())
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "delta"]) == 2  # final/ is a delta already
    assert "holds a delta already" in capsys.readouterr().err


def test_export_cli_prints_size_and_share_and_takes_bf16(pro_run, tmp_path, capsys):
    assert main(["export", str(pro_run), "--format", "delta", "--dtype", "bf16", "--out", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr().out
    config = json.loads((tmp_path / "d" / CONFIG).read_text())
    assert config["dtype"] == "bf16" and not config["exact"] and config["base"]["dtype"] == "fp32"
    assert f"{config['changed_params']:,} of {config['total_params']:,}" in printed.replace("\n", " ")
