"""Where a run's memory goes (engine/memory.py): the breakdown in report.json and `losia report`."""

from __future__ import annotations

import json

import pytest
import torch

from losia_cli.errors import ConfigError
from losia_cli.engine.loop import train
from losia_cli.engine.memory import PARTS
from losia_cli.report.html import render
from losia_cli.report.runs import label_runs, load_run


def test_breakdown_adds_up_to_the_measured_peak(tiny_config, tmp_path):
    """A tiny full fine-tune on CPU: the exact parts have their known sizes, and with the runtime
    measured before the model loads they account for the peak RSS within 10%. Robust to the machine:
    every part but the runtime is a byte count of tensors, the runtime and the peak are read from the
    same kernel counter in the same process, and RSS does not depend on how loaded the box is."""
    run = train(tiny_config("mem", "method=full", "train.max_steps=2"))
    mem = json.loads((run / "report.json").read_text())["memory_breakdown"]
    assert mem["gradients"] == mem["parameters"] > 0  # full: every parameter has an fp32 gradient
    # AdamW: exp_avg and exp_avg_sq per parameter, plus a 0-d step tensor each
    assert 2 * mem["parameters"] <= mem["optimizer_state"] < 2 * mem["parameters"] + 64 * 1024
    assert mem["activations"] > 0 and mem["runtime"] > 0
    assert sum(mem[k] for k in PARTS) + mem["rest"] == mem["measured_peak"]
    assert abs(mem["rest"]) <= 0.10 * mem["measured_peak"], mem

    runs = [load_run(run)]
    label_runs(runs)
    html = render(runs, True, [], tmp_path)
    assert "Memory at the peak" in html and "optimizer state" in html


@pytest.mark.skipif(torch.cuda.is_available(), reason="the snapshot is taken on CUDA")
def test_memory_profile_is_refused_on_cpu_before_anything_is_written(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.memory_profile"):
        train(tiny_config("prof", "train.memory_profile=true"))
    assert not (tmp_path / "prof").exists()
