"""A damaged run dir read by merge, report, eval, export and chat; where merge may write; the modes of the
files losia writes; a resume that finds nothing to resume (issue 22)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from losia_cli.cli import main
from losia_cli.compose import load_config
from losia_cli.engine import step as step_driver
from losia_cli.workflow import train

TINY = ("data.max_length=64", "train.micro_batch_size=4", "train.warmup_ratio=0", "train.max_steps=2")


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """A finished full fine-tuning run and a finished LoRA run, trained once for the module."""
    root = tmp_path_factory.mktemp("runs")
    return {method: train(load_config([f"model.name_or_path={tiny_llama_dir}", *TINY, f"run.output_dir={root}",
                                       f"run.name={method}", f"method={method}"]))
            for method in ("full", "lora")}


def tree(root: Path) -> dict[str, object]:
    """What a dir holds, links and dirs included, to show that nothing in it changed."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = ("link", os.readlink(path))
        elif path.is_dir():
            found[key] = "dir"
        elif path.is_file():
            found[key] = path.read_bytes()
        else:
            found[key] = "special"  # a FIFO: reading it would wait for a writer
    return found


def _truncate(path: Path) -> None:
    """Cut the file off as a crash mid-write could: JSON at its middle, YAML inside a key past its
    middle (YAML cut at a line end can still parse)."""
    text = path.read_text()
    m = re.compile(r"^ *[a-z_]{6,}: ", re.M).search(text, len(text) // 2)
    path.write_text(text[:m.start() + m.group().index(":") - 2] if path.suffix == ".yaml" else text[:len(text) // 2])


DAMAGES = {
    "truncated": _truncate,
    "garbled": lambda path: path.write_bytes(b"method:\n  name: \xff\xfe full\n"),
    "empty": lambda path: path.write_bytes(b""),
    "a list": lambda path: path.write_text("[1, 2]\n"),
    "a dir": lambda path: (path.unlink(), path.mkdir()),
    "a dangling link": lambda path: (path.unlink(), path.symlink_to(path.parent / "gone")),
    "a fifo": lambda path: (path.unlink(), os.mkfifo(path)),  # reading it would wait forever
    "missing": lambda path: path.unlink(),
}
MESSAGES = {"truncated": r"not valid (YAML|JSON) \(line \d+\)", "garbled": r"not UTF-8 text \(line 2\)|not valid JSON",
            "empty": "empty", "a list": "not a (YAML|JSON) mapping", "a dir": "not a regular file",
            "a dangling link": "a symbolic link to nothing", "a fifo": "not a regular file", "missing": "missing"}


def _command(name: str, run_dir: Path, out: Path) -> list[str]:
    return {
        "merge": ["merge", str(run_dir), "--out", str(out)],
        "report": ["report", str(run_dir), "--out", str(out)],
        "eval": ["eval", str(run_dir), "tasks=[gsm8k@bundled:gsm8k_sample]", "limit=1", "forgetting=false",
                 "--out", str(out)],
        "export": ["export", str(run_dir), "--format", "gguf", "--out", str(out / "m.gguf")],
        "chat": ["chat", str(run_dir), "--max-new-tokens", "1"],
    }[name]


COMMANDS = ("merge", "report", "eval", "export", "chat")
# (run, file, the commands that read it); report reads only the run's records, the others the model too.
CASES = [("full", "config.yaml", COMMANDS), ("lora", "config.yaml", COMMANDS),
         ("full", "final/config.json", COMMANDS[:1] + COMMANDS[2:]),
         ("lora", "final/adapter_config.json", COMMANDS[:1] + COMMANDS[2:]),
         ("lora", "final/tokenizer_config.json", COMMANDS[:1] + COMMANDS[2:]),
         ("full", "report.json", ("report",))]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("method, name, commands", CASES, ids=[f"{m}-{n}" for m, n, _ in CASES])
def test_a_damaged_run_file_is_one_line_naming_it(runs, tmp_path, monkeypatch, capsys, method, name, commands,
                                                  damage):
    if name == "report.json" and damage == "missing":
        pytest.skip("a run without report.json (crashed, or still running) gets a report from its records")
    run_dir = tmp_path / "run"
    shutil.copytree(runs[method], run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    DAMAGES[damage](run_dir / name)
    before = tree(run_dir)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    if name == "config.yaml" and damage == "missing":  # report needs only the records (test below)
        commands = tuple(c for c in commands if c != "report")
    for command in commands:
        out = tmp_path / "out"
        code = main(_command(command, run_dir, out))
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if not line.startswith("note:")]
        where = f"{command} with {name} {damage}"
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, f"{where}: exit {code}\n{err}"
        if name == "config.yaml" and damage == "missing":  # not a run dir then; eval & co: nor a model dir
            assert str(run_dir) in lines[0], where  # then it is no run dir: taken as a model dir without config.json
        else:
            assert f"{run_dir / name}: " in lines[0] and re.search(MESSAGES[damage], lines[0]), f"{where}: {lines[0]}"
        assert tree(run_dir) == before and not out.exists(), where


def test_report_reads_a_run_without_config_yaml(runs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["full"], run_dir, ignore=shutil.ignore_patterns("checkpoints", "config.yaml"))
    assert main(["report", str(run_dir)]) == 0  # its records are enough; config.yaml is optional there


def test_a_config_yaml_without_a_method_or_a_model_is_named(runs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["lora"], run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    (run_dir / "config.yaml").write_text("method: full\n")
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "m")]) == 2
    assert f"{run_dir / 'config.yaml'}: no method.name" in capsys.readouterr().err
    (run_dir / "config.yaml").write_text("method: {name: lora}\nmodel: {name_or_path: 3, dtype: fp7}\n")
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'config.yaml'}: model." in err and len(err.strip().splitlines()) == 1, err


# --- where merge and report may write ----------------------------------------------------------------------
@pytest.mark.parametrize("out, reason", [
    (".", "holds the working directory"), ("..", "holds the working directory"), ("/", "holds the working directory"),
    ("RUN", "is a run dir"), ("PARENT", "holds files losia did not write"), ("FILE", "is a file"),
    ("LINK", "is a symbolic link"),
])
@pytest.mark.parametrize("command", ["merge", "report"])
def test_an_out_that_would_lose_something_is_refused_before_anything_is_touched(
        runs, tmp_path, monkeypatch, capsys, command, out, reason):
    parent = tmp_path / "runs"
    run_dir = parent / "run"
    shutil.copytree(runs["full"], run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    (tmp_path / "FILE").write_text("mine")
    (tmp_path / "LINK").symlink_to(tmp_path / "elsewhere")
    cwd = tmp_path / "here"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # an empty working dir: only the rule, not its files, can refuse `.`
    target = {"RUN": run_dir, "PARENT": parent, "FILE": tmp_path / "FILE", "LINK": tmp_path / "LINK"}.get(out, out)
    before = tree(tmp_path)
    assert main([command, str(run_dir), "--out", str(target), *(["--force"] if command == "merge" else [])]) == 2
    err = capsys.readouterr().err
    assert f"--out: {target} {reason}" in err and len(err.strip().splitlines()) == 1, err
    assert tree(tmp_path) == before


# --- file modes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_written_honours_the_umask(tiny_llama_dir, tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        run_dir = train(load_config([f"model.name_or_path={tiny_llama_dir}", *TINY, f"run.output_dir={tmp_path}",
                                     "run.name=r", "method=full", "train.save_every=1"]))
        assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
        assert main(["report", str(run_dir)]) == 0
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"model.safetensors", "optimizer.pt", "config.yaml", "report.html", "MANIFEST.json"} <= {p.name for p in files}
    wrong = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != mode}
    assert not wrong


# --- run.resume=auto with nothing to resume ----------------------------------------------------------------------
@pytest.mark.parametrize("left", ["no checkpoints", "a damaged checkpoint", "an empty dir"])
def test_resume_auto_with_nothing_to_resume_says_so(tiny_config, tmp_path, monkeypatch, capsys, left):
    common = ("method=full", "train.max_steps=3", "train.save_every=1")
    run_dir = tmp_path / "run"
    if left == "an empty dir":
        run_dir.mkdir()
    else:
        real, calls = step_driver.token_loss_sum, []
        # The third loss computation fails: a run killed during step 3, with step-1 and step-2 saved.
        monkeypatch.setattr(step_driver, "token_loss_sum",
                            lambda *a: calls.append(1) or (real(*a) if len(calls) < 3 else 1 / 0))
        with pytest.raises(ZeroDivisionError):
            train(tiny_config("run", *common))
        monkeypatch.undo()
        if left == "no checkpoints":
            shutil.rmtree(run_dir / "checkpoints")
        else:
            for ckpt in (run_dir / "checkpoints").iterdir():
                (ckpt / "optimizer.pt").write_bytes(b"")
    capsys.readouterr()
    train(tiny_config("run", *common, "run.resume=auto"))
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "nothing to resume" in line]
    if left == "an empty dir":  # a first start (how a Slurm job begins): nothing to say
        assert not warnings
    else:
        why = "no checkpoints/step-N" if left == "no checkpoints" else "no intact checkpoint"
        assert warnings == [f"warning: run.resume=auto: nothing to resume in {run_dir} ({why}); "
                            "starting over from step 1"]
    assert "resumed at step" not in out
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
