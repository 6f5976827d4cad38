"""Multi-process training on CPU (gloo, 2 processes) through `losia train ... dist=...`: DDP and
ZeRO-2 match one process, only the subnet is all-reduced, a preempted run resumes bit-exactly (DDP,
FSDP, single), and FSDP (LoSiA in its delta form) / ZeRO-3 train what DDP trains. Each run relaunches
the CLI, as a user would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from losia_cli.compose import load_config
from losia_cli.config import RunConfig
from losia_cli.errors import ConfigError
from losia_cli.launch import launch_command

from test_losia_support import FP64_ATOL

pytestmark = pytest.mark.slow

STEPS = 10
# Runs compared across process counts or sharding sum the same numbers in another order: in fp64 they
# are held to FP64_ATOL on any CPU. DeepSpeed runs stay fp32 (it reduces an fp64 model's gradients in
# lower precision, 5e-9 off), and are compared bit for bit with an fp32 DDP run.
FP64 = "model.dtype=fp64"


def common(model_dir: Path, out: Path, fp64: bool = True) -> list[str]:
    return [
        f"model.name_or_path={model_dir}", "data.max_length=64", f"train.max_steps={STEPS}",
        "train.warmup_ratio=0.2", "train.save_every=4", "method.period=2", f"run.output_dir={out}",
        *([FP64] if fp64 else []),
    ]


def losia(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "losia_cli.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run(out: Path, name: str, *args: str) -> Path:
    proc = losia(*args, f"run.name={name}")
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    return out / name


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((run_dir / "final").glob("*.safetensors"))))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def blocks(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["module"], r["rows"], r["cols"]) for r in jsonl(run_dir / "subnets.jsonl")]


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """Straight runs, each once: the same global batch of 4 as 1x4 or 2 processes x 2."""
    out = tmp_path_factory.mktemp("dist")
    base, base32 = common(tiny_llama_dir, out), common(tiny_llama_dir, out, fp64=False)
    two = ["dist.num_processes=2", "train.micro_batch_size=2"]
    return {
        "single-losia_pro": run(out, "single-losia_pro", *base, "method=losia_pro", "train.micro_batch_size=4"),
        "ddp-losia_pro": run(out, "ddp-losia_pro", *base, "method=losia_pro", "dist=ddp", *two),
        "ddp32-losia_pro": run(out, "ddp32-losia_pro", *base32, "method=losia_pro", "dist=ddp", *two),
        "zero2-losia_pro": run(out, "zero2-losia_pro", *base32, "method=losia_pro", "dist=zero2", *two),
        "fsdp-losia_pro": run(out, "fsdp-losia_pro", *base, "method=losia_pro", "dist=fsdp", *two),
        "ddp-lora": run(out, "ddp-lora", *base, "method=lora", "dist=ddp", *two),
        "ddp-full": run(out, "ddp-full", *base, "method=full", "dist=ddp", *two),
    }


def test_ddp_and_zero2_match_one_process(runs):
    single = weights(runs["single-losia_pro"])
    for name in ("ddp-losia_pro", "ddp32-losia_pro", "zero2-losia_pro"):
        report = json.loads((runs[name] / "report.json").read_text())
        assert report["num_processes"] == 2 and report["ranks_in_sync"] is True
        assert report["subnet_rank_disagreements"] == 0
        assert blocks(runs[name]) == blocks(runs["single-losia_pro"])
    got = weights(runs["ddp-losia_pro"])
    for key in single:  # only the padding of the micro-batches differs: summation order
        assert got[key].dtype == torch.float64, key
        torch.testing.assert_close(got[key], single[key], rtol=0, atol=FP64_ATOL, msg=key)
    # ZeRO-2 reduce-scatters what DDP all-reduces: with two ranks the sums are the same numbers.
    ddp, zero2 = weights(runs["ddp32-losia_pro"]), weights(runs["zero2-losia_pro"])
    assert all(torch.equal(ddp[k], zero2[k]) for k in ddp)
    assert sorted(p.name for p in (runs["zero2-losia_pro"] / "checkpoints").iterdir())[-1] == "step-8"
    assert (runs["zero2-losia_pro"] / "checkpoints" / "step-8" / "optimizer-rank1.pt").is_file()


def test_ddp_all_reduces_only_the_subnet(runs):
    """DDP's buckets carry exactly the trainable tensors: for LoSiA-Pro the blocks (about p^2 of each
    targeted matrix) and its dense extras; for full fine-tuning everything. LoSiA-Pro's scoring layer
    all-reduces its m x n gradient besides, and that is counted too."""
    sync = {}
    for name in ("ddp-losia_pro", "ddp-full", "ddp-lora"):
        report = json.loads((runs[name] / "report.json").read_text())
        ddp_bytes = report["grad_sync_bytes_per_step"] - report["method_sync_bytes_per_step"]
        assert ddp_bytes == 8 * report["trainable_params"], name  # fp64 (common())
        sync[name] = ddp_bytes
        assert (report["method_sync_bytes_per_step"] > 0) == (name == "ddp-losia_pro"), name
    assert sync["ddp-losia_pro"] < sync["ddp-lora"] < sync["ddp-full"] / 100


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} lines (exit {proc.poll()})")


@pytest.mark.parametrize(
    "method,dist", [("losia_pro", "ddp"), ("lora", "ddp"), ("losia_pro", "fsdp"), ("losia_pro", "single")]
)
def test_preempted_run_resumes_bit_exactly(runs, tiny_llama_dir, method, dist):
    straight = runs[f"{dist}-{method}"]
    out = straight.parent
    name = f"preempted-{dist}-{method}"
    two = [f"dist={dist}", "dist.num_processes=2", "train.micro_batch_size=2"]
    batch = ["train.micro_batch_size=4"] if dist == "single" else two
    args = [*common(tiny_llama_dir, out), f"method={method}", *batch]
    proc = losia(*args, f"run.name={name}")
    wait_for_lines(out / name / "metrics.jsonl", 1, proc)
    proc.send_signal(signal.SIGUSR1)  # what Slurm sends before the time limit
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, log[-3000:]
    assert "preempted at step" in log and not (out / name / "report.json").exists()
    stopped = int(log.split("preempted at step ")[1].split(":")[0])
    assert stopped < STEPS and (out / name / "checkpoints" / f"step-{stopped}").is_dir()

    resumed = run(out, name, *args, "run.resume=auto")
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[m["loss"] for m in jsonl(d / "metrics.jsonl")] for d in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS
    assert blocks(straight) == blocks(resumed)


def test_fsdp_checkpoint_resumes_only_under_fsdp(runs, tiny_llama_dir, tmp_path):
    """Its W lacks the blocks trained since they last moved (delta form) and its optimizer state is
    keyed by name: continuing it under DDP would be silently wrong, so it is refused."""
    shutil.copytree(runs["fsdp-losia_pro"], tmp_path / "moved", ignore=shutil.ignore_patterns("final", "report.json"))
    two = ["dist=ddp", "dist.num_processes=2", "train.micro_batch_size=2"]
    proc = losia(*common(tiny_llama_dir, tmp_path), "method=losia_pro", *two, "run.name=moved", "run.resume=auto")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "was written under dist=fsdp; resume it the same way" in log


@pytest.mark.parametrize("method,dist", [("losia_pro", "fsdp"), ("full", "fsdp"), ("lora", "zero3")])
def test_sharded_weights_train_the_same_model(runs, tiny_llama_dir, method, dist):
    """FSDP / ZeRO-3 train what DDP trains. LoSiA runs in its delta form there (W written only when a
    block moves), on DTensor shards, and picks the same blocks."""
    out = runs["ddp-full"].parent
    deepspeed = dist.startswith("zero")
    base = [a for a in common(tiny_llama_dir, out, fp64=not deepspeed) if not a.startswith("train.save_every")]
    two = [f"method={method}", "dist.num_processes=2", "train.micro_batch_size=2"]
    if method == "losia_pro":  # both runs are in `runs` already
        got, reference = runs["fsdp-losia_pro"], runs["ddp-losia_pro"]
        assert blocks(got) == blocks(reference)
        # Checked, not assumed: the ranks' replicated tensors (R, C, norms) hash the same.
        assert json.loads((got / "report.json").read_text())["ranks_in_sync"] is True
        # Really sharded (accelerate's own FSDP would fall back to DDP on CPU): DTensor parameters.
        assert json.loads((got / "checkpoints" / "step-8" / "trainer_state.json").read_text())["sharded"]
    else:
        got = run(out, f"{dist}-{method}", *base, f"dist={dist}", *two)
        reference = run(out, f"{dist}-{method}-ddp", *base, "dist=ddp", *two)
    a, b = weights(reference), weights(got)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5 if deepspeed else FP64_ATOL, msg=key)
    # The norm clipping saw (pre-clip, logged per step) is the global one over the shards too.
    norms = [torch.tensor([m["grad_norm"] for m in jsonl(d / "metrics.jsonl")]) for d in (reference, got)]
    assert (norms[0] > 0).all()
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-4 if deepspeed else 1e-12, atol=0)


@pytest.mark.parametrize("overrides,message", [
    (["method=losia_pro", "dist=zero3"], "dist=zero3 with losia_pro is not supported; use dist=fsdp"),
    (["method=galore", "dist=zero2"], "GaLore projects 2-D gradients"),
    (["method=pissa", "dist=fsdp"], "dist=fsdp: PiSSA's export converts the live"),
    (["method=lora", "dist=zero3", "train.save_every=5"], "train.save_every: checkpoints under dist=zero3"),
    (["dist.num_processes=2"], "dist=single runs one process"),
    (["dist=ddp", "dist.num_machines=2"], "set dist.main_process_ip"),
])
def test_unsupported_combinations_fail_before_anything_runs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_launch_command_passes_the_rendezvous_and_the_overrides():
    cfg = load_config(["dist=zero2", "dist.num_processes=16", "dist.num_machines=2", "dist.machine_rank=1",
                       "dist.main_process_ip=10.0.0.1", "run.name=job"])
    assert isinstance(cfg, RunConfig)
    cmd = launch_command(cfg, ["dist=zero2", "dist.num_processes=16"], None)
    def flag(name: str) -> str:
        return cmd[cmd.index(name) + 1]

    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert flag("--num_processes") == "16" and flag("--num_machines") == "2"
    assert flag("--machine_rank") == "1" and flag("--main_process_ip") == "10.0.0.1"
    assert cmd[-4:] == ["train", "dist=zero2", "dist.num_processes=16", "run.name=job"]
    assert flag("--main_process_port") == "29500"  # across machines every node needs the same port


def test_one_machine_launch_takes_a_free_port_unless_one_is_set():
    """Two runs on one box must not both try port 29500."""
    import socket

    def port(*overrides: str) -> int:
        cmd = launch_command(load_config(["dist=ddp", "dist.num_processes=2", *overrides]), [], None)
        return int(cmd[cmd.index("--main_process_port") + 1])

    with socket.socket() as busy:
        try:
            busy.bind(("127.0.0.1", 29500))
        except OSError:
            pass  # someone else holds it: just as good
        assert port() != 29500
    assert port("dist.main_process_port=23456") == 23456


def test_val_loss_is_shared_out_and_matches_one_process(tiny_llama_dir, tmp_path):
    """Each rank takes its share of the val set (an odd number of batches here) and the all-reduced
    loss is one process's. The one update has LR 0 (warmup), so all three validate the same weights."""
    base = [f"model.name_or_path={tiny_llama_dir}", "data.max_length=64", "data.val_split=0.2", "method=full",
            "train.max_steps=1", "train.warmup_ratio=1", "train.micro_batch_size=2", f"run.output_dir={tmp_path}",
            FP64]  # the ranks' sums of token losses add in another order
    two = ["dist.num_processes=2"]
    losses = {name: [r["val_loss"] for r in jsonl(run(tmp_path, name, *base, *extra) / "metrics.jsonl")
                     if "val_loss" in r]
              for name, extra in (("single", []), ("ddp", ["dist=ddp", *two]), ("fsdp", ["dist=fsdp", *two]))}
    assert len(losses["single"]) == 1
    for name in ("ddp", "fsdp"):
        assert abs(losses[name][0] - losses["single"][0]) < FP64_ATOL, losses
