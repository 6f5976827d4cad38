"""Nothing lost, nothing escapes (issue 16): run-dir safety, crash safety, and bad input that must end in
one line, a non-zero exit and nothing left behind. The sandbox has its own tests (test_sandbox.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import yaml

from losia_cli import atomic
from losia_cli.cli import main
from losia_cli.errors import ConfigError
from losia_cli.engine import checkpoint, rundir
from losia_cli.engine import step as step_driver
from losia_cli.workflow import train
from losia_cli.errors import MergeError
from losia_cli.merge import merge

TINY = ("data.max_length=64", "train.micro_batch_size=4", "train.warmup_ratio=0")


def one_line_error(capsys, *needles: str) -> str:
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:"))
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def cli_train(tiny_llama_dir, tmp_path, *overrides: str) -> int:
    return main(["train", f"model.name_or_path={tiny_llama_dir}", f"run.output_dir={tmp_path}", *TINY, *overrides])


def crash_at_call(monkeypatch, n: int) -> None:
    """Make the n-th loss computation of the next training raise (a kill mid-run)."""
    real, calls = step_driver.token_loss_sum, {"n": 0}

    def crash(logits, labels):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated kill")
        return real(logits, labels)

    monkeypatch.setattr(step_driver, "token_loss_sum", crash)


@pytest.fixture
def finished(tiny_config):
    """A finished 2-step full fine-tuning run."""
    return train(tiny_config("done", "method=full", "train.max_steps=2"))


def run_files(run_dir) -> dict:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


# --- run dirs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [".", "..", "a/b", "../x", "a b", "$HOME", ".hidden"])
def test_run_name_is_one_safe_dir_name(tiny_llama_dir, tmp_path, capsys, name):
    (tmp_path / "keep.txt").write_text("mine")
    assert cli_train(tiny_llama_dir, tmp_path, f"run.name={name}", "run.overwrite=true") == 2
    one_line_error(capsys, "run.name: must be one directory name")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_slurm_refuses_a_run_name_with_spaces(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["slurm", "smollm2_135m_math", "run.name=my run", "--nodes", "1", "--gpus-per-node", "1",
                 "--time", "01:00:00"])
    assert code == 2
    one_line_error(capsys, "run.name")
    assert not any(tmp_path.rglob("*.sbatch"))


def test_overwrite_deletes_nothing_before_data_and_model_are_checked(finished, tiny_llama_dir, tmp_path, capsys):
    before = run_files(finished)
    code = cli_train(tiny_llama_dir, tmp_path, "run.name=done", "run.overwrite=true", "data.source=nope.jsonl")
    assert code == 2
    one_line_error(capsys, "nope.jsonl")
    assert run_files(finished) == before and (finished / "final").is_dir()


def test_overwrite_deletes_only_a_run_dir(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert cli_train(tiny_llama_dir, tmp_path, "run.name=precious", "run.overwrite=true") == 2
    one_line_error(capsys, "is not a run dir")
    assert (precious / "thesis.tex").read_text() == "years of work"
    # A run dir the user stands in is not deleted either.
    (precious / "config.yaml").write_text("a: 1")
    monkeypatch.chdir(precious)
    with pytest.raises(ConfigError, match="holds the working directory"):
        rundir.check_fresh(precious, overwrite=True)
    assert (precious / "thesis.tex").exists()


def test_a_second_writer_is_refused_naming_the_holder(finished, tiny_config, tiny_llama_dir, tmp_path, capsys):
    (finished / "report.json").unlink()  # resumable again
    lock = rundir.RunLock(finished)  # the first writer, still running
    try:
        before = run_files(finished)
        assert cli_train(tiny_llama_dir, tmp_path, "run.name=done", "method=full", "run.resume=auto") == 2
        one_line_error(capsys, "is in use by", f"pid {os.getpid()} on {socket.gethostname()}")
        assert run_files(finished) == before
    finally:
        lock.release()
    # Released when the run ends, or fails: the next writer gets in.
    train(tiny_config("done", "method=full", "train.max_steps=2", "run.resume=auto"))


def test_a_second_continual_run_is_refused_naming_the_holder(tiny_llama_dir, tmp_path, capsys):
    parent = tmp_path / "cont"
    parent.mkdir()
    (parent / "continual.json").write_text('{"stages": "the first run"}')
    lock = rundir.RunLock(parent)  # the first `losia train` of the recipe, still running
    try:
        code = cli_train(tiny_llama_dir, tmp_path, "recipe=smollm2_135m_continual", "run.name=cont",
                         "run.overwrite=true", "eval.limit=1")
        assert code == 2
        one_line_error(capsys, f"run dir {parent} is in use by pid {os.getpid()} on {socket.gethostname()}")
        assert (parent / "continual.json").read_text() == '{"stages": "the first run"}'
    finally:
        lock.release()
    # A dir that is no run's is refused before the lock would leave its file there.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    assert cli_train(tiny_llama_dir, tmp_path, "recipe=smollm2_135m_continual", "run.name=precious") == 2
    one_line_error(capsys, "already exists")
    assert [p.name for p in (tmp_path / "precious").iterdir()] == ["thesis.tex"]


def test_a_sweep_job_mistake_is_one_line_and_a_traceback_only_with_debug(tiny_llama_dir, tmp_path, capsys):
    sweep = ["train", "-m", "method=full,lora", f"model.name_or_path={tiny_llama_dir}", "data.source=nope.jsonl",
             f"run.output_dir={tmp_path}"]
    with pytest.raises(SystemExit) as stop:  # the job's exit ends the sweep
        main(sweep)
    assert stop.value.code == 2
    one_line_error(capsys, "nope.jsonl: no such file or directory (data.source)")
    with pytest.raises(SystemExit):  # Hydra prints the job's traceback and exits
        main(["--debug", *sweep])
    assert "Traceback" in capsys.readouterr().err


def test_merge_and_report_refuse_an_out_they_did_not_write(finished, tmp_path, capsys):
    before = run_files(finished)
    assert main(["merge", str(finished), "--out", str(finished), "--force"]) == 2
    one_line_error(capsys, "is a run dir")
    assert run_files(finished) == before
    out = tmp_path / "site"
    out.mkdir()
    (out / "report.html").write_text("an old page")
    (out / "notes.md").write_text("mine")
    assert main(["report", str(finished), "--out", str(out)]) == 2
    one_line_error(capsys, "notes.md")
    assert (out / "notes.md").read_text() == "mine"
    # What they wrote themselves they may replace.
    assert main(["merge", str(finished), "--out", str(tmp_path / "m")]) == 0
    assert main(["merge", str(finished), "--out", str(tmp_path / "m"), "--force"]) == 0
    (out / "notes.md").unlink()
    (out / "report.html").unlink()
    assert main(["report", str(finished), "--out", str(out)]) == 0
    assert main(["report", str(finished), "--out", str(out)]) == 0


# --- crash safety ------------------------------------------------------------------------------------
def test_resume_skips_a_cut_line_and_a_damaged_checkpoint(tiny_config, tmp_path, monkeypatch, capsys):
    fsynced = []
    real_fsync = atomic._fsync
    monkeypatch.setattr(atomic, "_fsync", lambda path: fsynced.append(path) or real_fsync(path))
    common = ("method=losia_pro", "method.period=2", "train.max_steps=5", "train.save_every=1")
    real_loss = step_driver.token_loss_sum
    crash_at_call(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(tiny_config("run", *common))
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-3"]
    built = ckpts / ".step-3.tmp"  # every file and the dir reached the disk before the rename, then the rename
    assert {f.name for f in (ckpts / "step-3").iterdir()} == {p.name for p in fsynced if p.parent == built}
    assert fsynced[fsynced.index(built) + 1] == ckpts
    # The disk then damages the newest checkpoint, and the crash cut the last metrics line short.
    weights = ckpts / "step-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    monkeypatch.setattr(step_driver, "token_loss_sum", real_loss)
    train(tiny_config("run", *common, "run.resume=auto"))
    out, err = capsys.readouterr()
    assert "step-3 is damaged (model.safetensors does not match its checksum)" in err
    assert "resumed at step 2" in out
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_kills_before_the_first_checkpoint_never_duplicate_records(tiny_config, tmp_path, monkeypatch):
    common = ("method=losia_pro", "method.period=2", "train.max_steps=3", "train.save_every=2")
    straight = train(tiny_config("straight", *common))
    for _ in range(3):
        crash_at_call(monkeypatch, 1)
        with pytest.raises(RuntimeError, match="simulated kill"):
            train(tiny_config("killed", *common, "run.resume=auto"))
    monkeypatch.undo()
    run_dir = train(tiny_config("killed", *common, "run.resume=auto"))
    lines = (run_dir / "subnets.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) > 0
    assert lines == (straight / "subnets.jsonl").read_text().splitlines()


# --- bad input ---------------------------------------------------------------------------------------
def test_target_modules_matching_nothing_leaves_no_run_dir(tiny_llama_dir, tmp_path, capsys):
    for method in ("lora", "losia_pro"):
        code = cli_train(tiny_llama_dir, tmp_path, f"method={method}", "method.target_modules=[nope]", "run.name=tm")
        assert code == 2
        one_line_error(capsys, "method.target_modules")
        assert not (tmp_path / "tm").exists()


def test_truncated_lora_adapter_in_merge(tiny_config, tmp_path, capsys):
    run_dir = train(tiny_config("lora", "method=lora", "train.max_steps=1"))
    adapter = run_dir / "final" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:200])
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "m")]) == 2
    one_line_error(capsys, "cannot read the adapter in")
    assert not (tmp_path / "m").exists()
    with pytest.raises(MergeError):
        merge(run_dir, tmp_path / "m")


def test_report_names_a_non_utf8_metrics_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 1.0}).encode() for s in (1, 2, 3)]
    lines[1] = b'{"step": 2, "note": "caf\xe9"}'
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert main(["report", str(run)]) == 2
    one_line_error(capsys, "metrics.jsonl:2 is not UTF-8")
    assert not (run / "report").exists()


def test_eval_mistakes_are_named_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["eval", "runs/nope", "tasks=[]", "forgetting=false"]) == 2
    one_line_error(capsys, "nothing to evaluate")
    assert main(["eval", "runs/nope"]) == 2
    err = one_line_error(capsys, "model path not found: runs/nope")
    assert "huggingface" not in err.lower()
    unfinished = tmp_path / "runs" / "half"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "full"}}))
    assert main(["eval", "runs/half"]) == 2
    one_line_error(capsys, "has no final/")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["half"]


def test_a_read_only_run_dir_is_one_line(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    # Root ignores file modes, so the OS's refusal is simulated where the run dir is first written.
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(rundir.os, "open", refuse)
    assert cli_train(tiny_llama_dir, tmp_path, "run.name=ro", "train.max_steps=1") == 2
    one_line_error(capsys, f"run dir {tmp_path / 'ro'}: cannot write there (Permission denied)")


def on_a_tiny_disk(tmp_path, script: str, *args: str) -> subprocess.CompletedProcess:
    """bash `script` in a private user+mount namespace (so root and non-root alike), where it may mount a
    tmpfs on $1 (an empty dir); $2 is this Python, $3... are `args`. Skips where there are no user namespaces."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode:
        pytest.skip("no user namespaces here to mount a tiny tmpfs in")
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(["unshare", "-rm", "bash", "-c", script, "sh", str(disk), sys.executable, *args],
                          capture_output=True, text=True, env=env, timeout=300)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


FULL_AND_READ_ONLY = """
set -e
mount -t tmpfs -o size=300k tmpfs "$1"
"$2" -m losia_cli.cli train "${@:3}" run.output_dir="$1" run.name=full || echo "exit=$?"
"$2" -m losia_cli.cli train -m method=full,lora "${@:3}" run.output_dir="$1/sweep" || echo "exit=$?"
mount -o remount,ro "$1"
"$2" -m losia_cli.cli train "${@:3}" run.output_dir="$1" run.name=full run.resume=auto || echo "exit=$?"
"""


def test_a_full_disk_and_a_read_only_disk_are_one_line(tiny_llama_dir, tmp_path):
    """A real 300 KiB tmpfs: a run, then a sweep's first job (a sweep stops at a failed job) fill it."""
    args = [f"model.name_or_path={tiny_llama_dir}", *TINY, "train.max_steps=2", "method=full"]
    proc = on_a_tiny_disk(tmp_path, FULL_AND_READ_ONLY, *args)
    disk = tmp_path / "disk"
    assert error_lines(proc) == ["error: cannot write: No space left on device"] * 2 + [
        f"error: run dir {disk}/full: cannot write there (Read-only file system)"], proc.stderr[-3000:]
    assert proc.stdout.count("exit=2") == 3


# The tiny Llama's checkpoint (full fine-tuning) takes 38.7 MB: 12.9 MB of weights, 25.8 MB of AdamW
# state. 64 MiB (67.1 MB) holds step-1's and step-2's weights, and fills inside step-2's optimizer.pt.
FULL_INSIDE_TORCH_SAVE = """
set -e
mount -t tmpfs -o size=64m tmpfs "$1"
"$2" -m losia_cli.cli train "${@:4}" run.output_dir="$1" run.name=full || echo "exit=$?"
ls -A "$1/full/checkpoints"
cp -r "$1/full/checkpoints/step-1" "$3"
"""


def test_a_full_disk_inside_torch_save_is_one_line_and_keeps_the_last_checkpoint(tiny_llama_dir, tmp_path):
    args = [f"model.name_or_path={tiny_llama_dir}", *TINY, "train.max_steps=3", "train.save_every=1", "method=full"]
    proc = on_a_tiny_disk(tmp_path, FULL_INSIDE_TORCH_SAVE, str(tmp_path / "step-1"), *args)
    assert error_lines(proc) == ["error: cannot write: No space left on device"], proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-2:] == ["exit=2", "step-1"]  # step-2's temp dir is gone
    step1 = tmp_path / "step-1"
    assert checkpoint.damage(step1) is None
    sizes = {p.name: p.stat().st_size for p in step1.iterdir()}
    # Where the disk filled: step-2's weights fit beside step-1, its optimizer state does not.
    assert sum(sizes.values()) + sizes["model.safetensors"] < 64 * 2**20 < 2 * sum(sizes.values())
