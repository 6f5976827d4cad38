"""`losia merge`: bit-exact export for full-weight methods, PEFT folding, atomicity, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from losia_cli import merge as merge_module
from losia_cli.cli import main
from losia_cli.workflow import train
from losia_cli.errors import MergeError
from losia_cli.merge import merge


@pytest.fixture
def full_run(tiny_config):
    return train(tiny_config("full", "method=full", "train.max_steps=2"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_losia_pro_merge_reloads_bit_exact(tiny_config, tmp_path, dtype):
    run_dir = train(tiny_config("pro", "method=losia_pro", "method.period=1", "train.max_steps=3"))
    out = tmp_path / f"merged-{dtype}"
    manifest = merge(run_dir, out, dtype=dtype)
    assert manifest["method"] == "losia_pro" and manifest["verified"]["logits_equal"]
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = {k: v.to(torch.bfloat16 if dtype == "bf16" else torch.float32).float()
                 for k, v in trained.state_dict().items()}
    for key, value in merged.state_dict().items():
        assert torch.equal(value, reference[key]), key
    on_disk = json.loads((out / "MANIFEST.json").read_text())
    assert set(on_disk["tensors"]) >= {k for k in merged.state_dict() if "lm_head" not in k}
    assert (out / "tokenizer_config.json").is_file() and (out / "config.json").is_file()


def test_lora_merge_matches_the_adapter_model(tiny_config, tmp_path):
    run_dir = train(tiny_config("lora", "method=lora", "method.rank=4", "train.lr=1e-2"))
    manifest = merge(run_dir, tmp_path / "merged")
    assert manifest["verified"]["max_abs_logit_diff_vs_adapter"] < 1e-4
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_interrupted_merge_leaves_no_output(full_run, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge_module, "_sha256", fail)  # dies after the shards are written
    with pytest.raises(OSError):
        merge(full_run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_refuses_to_overwrite_without_force(full_run, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["merge", str(full_run), "--out", str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["merge", str(full_run), "--out", str(tmp_path / "out"), "--force"]) == 0
    assert (tmp_path / "out" / "MANIFEST.json").is_file()


def test_clear_errors_for_unfinished_or_corrupt_runs(full_run, tmp_path):
    with pytest.raises(MergeError, match="no config.yaml"):
        merge(tmp_path, tmp_path / "a")
    shard = next((full_run / "final").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(MergeError, match="cannot read the model"):
        merge(full_run, tmp_path / "b")
    import shutil

    shutil.rmtree(full_run / "final")
    with pytest.raises(MergeError, match="no final/"):
        merge(full_run, tmp_path / "c")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda model: model.model.norm.weight.add_(1e-3), "tensors differ"),
        # A non-persistent buffer: the state dicts agree, only the forward shows it.
        (lambda model: model.model.rotary_emb.inv_freq.mul_(1.5), "logits differ"),
    ],
    ids=["tensor", "logits"],
)
def test_merge_refuses_a_copy_that_reloads_differently(full_run, tmp_path, monkeypatch, damage, message):
    real_load = merge_module.load_plain

    def load_damaged_copy(path, dtype=torch.float32):
        model = real_load(path, dtype)
        if path.name != "final":  # the freshly written copy, not the run's own final/
            with torch.no_grad():
                damage(model)
        return model

    monkeypatch.setattr(merge_module, "load_plain", load_damaged_copy)
    with pytest.raises(MergeError, match=f"verification failed: .*{message}"):
        merge(full_run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
