"""`losia slurm`: the generated sbatch script, run by bash against stand-in srun/scontrol (always) and
against a real single-node Slurm on loopback (when slurmctld, slurmd and munged are installed and we
are root); submitit sweeps through Hydra; the Dockerfile's install order."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from losia_cli.cli import main
from losia_cli.errors import SlurmError
from losia_cli.slurm import SlurmOptions, prepare, render, time_limit_seconds

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _options(**kw) -> SlurmOptions:
    return SlurmOptions(**{"nodes": 2, "gpus_per_node": 4, "time": "01:00:00", **kw})


# --- the script, without Slurm ----------------------------------------------------------------------
def test_cli_writes_a_valid_script(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["slurm", "smollm2_135m_math", "method=lora", "train.max_steps=7", "--nodes", "2",
                 "--gpus-per-node", "4", "--time", "02:00:00", "--partition", "gpu", "--account", "proj",
                 "--cpus-per-task", "16", "--mem", "200G", "--exclusive", "--signal-seconds", "300"])
    assert code == 0
    scripts = list((tmp_path / "runs").glob("*/slurm/job.sbatch"))
    assert len(scripts) == 1 and str(scripts[0]) in capsys.readouterr().out
    run_name = scripts[0].parents[1].name
    assert run_name.startswith("smollm2_135m_math-lora-")  # fixed now, so a requeued job finds its run dir
    text = scripts[0].read_text()
    subprocess.run(["bash", "-n", str(scripts[0])], check=True)
    sbatch = re.findall(r"^#SBATCH (\S+)$", text, flags=re.M)
    slurm_dir = scripts[0].parent
    assert sbatch == [
        f"--job-name={run_name}", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4",
        "--cpus-per-task=16", "--mem=200G", "--exclusive", "--time=02:00:00", "--partition=gpu",
        "--account=proj", "--requeue", "--signal=B:USR1@300", f"--chdir={tmp_path}",
        f"--output={slurm_dir}/%x-%j.out", f"--error={slurm_dir}/%x-%j.err", "--open-mode=append",
    ]
    assert f"run.name={run_name} run.resume=auto" in text
    assert "dist=ddp" in text  # the recipe's dist=single cannot run 8 processes


def test_cpu_job_has_no_gpu_line(tmp_path, monkeypatch):
    from losia_cli.resources import recipes_dir

    shutil.copytree(recipes_dir(), tmp_path / "my_recipes")
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "recipe=smollm2_135m_math", "run.name=cpu", "--nodes", "1", "--gpus-per-node", "0",
                 "--time", "30", "--out-dir", "jobs", "--recipes", "my_recipes"]) == 0
    text = (tmp_path / "jobs" / "job.sbatch").read_text()
    assert "--gpus-per-node" not in text and "dist=ddp" not in text
    assert '++dist.num_processes="$SLURM_NNODES"' in text
    assert f"losia_cli.cli train --recipes {tmp_path / 'my_recipes'} recipe=smollm2_135m_math" in text
    assert f"--output={tmp_path / 'jobs'}/%x-%j.out" in text


@pytest.mark.parametrize("reply, code, expected", [
    ("echo '123;cluster-a'", 0, "submitted job 123"),
    ("echo 'sbatch: error: invalid partition specified: gpu' >&2; exit 1",
     2, "sbatch refused {script}: sbatch: error: invalid partition specified: gpu"),
])
def test_submit_runs_sbatch(tmp_path, monkeypatch, capsys, reply, code, expected):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sbatch").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/sbatch-args\n{reply}\n')
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "smollm2_135m_math", "run.name=s", "--nodes", "1", "--gpus-per-node", "1",
                 "--time", "10", "--submit"]) == code
    script = tmp_path / "runs" / "s" / "slurm" / "job.sbatch"
    assert expected.format(script=script) in capsys.readouterr()[0 if code == 0 else 1]
    assert (tmp_path / "sbatch-args").read_text().split() == ["--parsable", str(script)]


@pytest.mark.parametrize("extra, message", [
    (["train.bogus=1"], "unknown key 'train.bogus'"),
    (["dist.num_processes=4"], "dist.num_processes is set by the job script"),
    (["run.resume=runs/x/checkpoints/step-2"], "run.resume is set by the job script"),
    (["--time", "1:00", "--signal-seconds", "120"], "--signal-seconds 120"),
    (["--time", "1h"], "--time '1h'"),
    (["--nodes", "0"], "--nodes 0"),
])
def test_mistakes_exit_2_before_writing(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    words = [w for w in extra if "=" in w]
    options = [w for w in extra if "=" not in w]  # argparse keeps the last value: these win
    argv = ["slurm", "smollm2_135m_math", *words, "--nodes", "1", "--gpus-per-node", "1", "--time", "10:00"]
    assert main(argv + options) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_submit_without_sbatch_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["slurm", "smollm2_135m_math", "run.name=x", "--nodes", "1", "--gpus-per-node", "0",
                 "--time", "10", "--submit"]) == 2
    err = capsys.readouterr().err
    assert "sbatch not found on PATH" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "runs" / "x" / "slurm" / "job.sbatch").is_file()  # written, for a manual sbatch


def test_time_formats():
    assert [time_limit_seconds(t) for t in ("30", "5:30", "1:00:00", "2-0", "1-2:3", "1-0:0:10")] == [
        1800, 330, 3600, 172800, 93780, 86410]
    with pytest.raises(SlurmError):
        time_limit_seconds("0")


# The script run by bash with stand-ins for srun/scontrol and for the training (a stub "python").
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done  # srun's own options
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'node-a\\nnode-b\\n' ;;
  requeue*) echo "$2" >> "$FAKE_DIR/requeued" ;;
esac
"""
STUB_TRAIN = """#!{python}
import json, os, signal, sys, time
out = os.path.join(os.environ["FAKE_DIR"], "train.json")
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append("USR1"))
with open(out + ".tmp", "w") as f:
    json.dump({{"argv": sys.argv[1:], "pid": os.getpid(), "cache": os.environ.get("LOSIA_CACHE")}}, f)
os.replace(out + ".tmp", out)
mode = os.environ["STUB_MODE"]
if mode == "wait_signal":
    while not got:
        time.sleep(0.05)
    print("stub got", got[0], flush=True)
    sys.exit(75)
sys.exit(int(mode))
"""


def _stub_bin(bin_dir: Path) -> Path:
    """srun and scontrol stand-ins in `bin_dir` (for PATH); returns the stub "python" beside them."""
    bin_dir.mkdir(parents=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("stub-python", STUB_TRAIN.format(python=sys.executable))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir / "stub-python"


def _start_job(script: Path, bin_dir: Path, fake_dir: Path, mode: str, **env) -> subprocess.Popen:
    """bash runs `script` as the batch shell of a 2-node job would, on node 1, against the stand-ins."""
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(fake_dir), "STUB_MODE": mode,
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           **env}
    return subprocess.Popen(["bash", str(script)], env=env, cwd=fake_dir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def fake_job(tmp_path, monkeypatch):
    """Render a 2-node x 4-GPU script whose python is a stub; return a function that runs it."""
    python = _stub_bin(tmp_path / "bin")
    monkeypatch.chdir(tmp_path)
    opts = _options()
    words, cfg, total = prepare("smollm2_135m_math", ["train.max_steps=3"], opts)
    assert total == 8
    script = tmp_path / "job.sbatch"
    script.write_text(render(words, cfg, opts, tmp_path, python=str(python)))
    return (lambda mode: _start_job(script, python.parent, tmp_path, mode)), cfg


def test_script_runs_training_with_node_settings(fake_job, tmp_path):
    start, cfg = fake_job
    job = start("0")
    assert job.wait(timeout=60) == 0, job.stdout.read()
    argv = json.loads((tmp_path / "train.json").read_text())["argv"]
    assert argv[:3] == ["-m", "losia_cli.cli", "train"]
    assert argv[3:] == [
        "recipe=smollm2_135m_math", "train.max_steps=3", "dist=ddp", f"run.name={cfg.run.name}",
        "run.resume=auto", "++dist.num_processes=8", "++dist.num_machines=2", "++dist.machine_rank=1",
        "++dist.main_process_ip=node-a", f"++dist.main_process_port={20000 + 4242 % 20000}",
    ]
    assert not (tmp_path / "requeued").exists()


def test_script_passes_failures_through_without_requeue(fake_job, tmp_path):
    start, _ = fake_job
    assert start("3").wait(timeout=60) == 3
    assert not (tmp_path / "requeued").exists()


def test_usr1_is_forwarded_and_a_checkpointed_exit_requeues(fake_job, tmp_path):
    start, _ = fake_job
    job = start("wait_signal")
    deadline = time.monotonic() + 60
    while not (tmp_path / "train.json").exists():
        assert job.poll() is None and time.monotonic() < deadline, "stub training never started"
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what Slurm does at --signal=B:USR1@S: to the batch shell only
    assert job.wait(timeout=60) == 0
    out = job.stdout.read()
    assert "got SIGUSR1, passing it to the training" in out and "stub got USR1" in out
    assert (tmp_path / "requeued").read_text().split() == ["4242"]


# --- hostile values: refused in one line, or quoted so that nothing they hold ever runs -------------------
# Each would create the file SENTINEL (in the job's working directory) if the shell ran it.
INJECTIONS = ["gpu\ntouch SENTINEL", "$(touch SENTINEL)", "`touch SENTINEL`", "$(>SENTINEL)", "gpu;touch SENTINEL",
              "gpu'$(>SENTINEL)'", 'gpu"$(>SENTINEL)"', "gpu\\", "gpu\r#", "gpu\x1b[2J", " 10", "10\n"]


def _preamble_is_directives_only(text: str) -> None:
    """Above `set -euo pipefail` the script is comments, and each #SBATCH line holds one word."""
    head = text.split("\nset -euo pipefail\n")[0].splitlines()
    assert all(line.startswith("#") or not line for line in head), head
    assert all(re.fullmatch(r"#SBATCH [^\s\"'\\]+", line) for line in head if line.startswith("#SBATCH")), head


# A path may hold `$`, `;` or backquotes (a #SBATCH line is no shell), but not what ends or splits the line.
HOSTILE_OPTIONS = [(option, value) for option in ("--partition", "--account", "--mem", "--time", "--job-name")
                   for value in INJECTIONS] + [("--out-dir", value) for value in INJECTIONS if re.search(r"[\s'\"\\\x1b]", value)]


@pytest.mark.parametrize("option, value", HOSTILE_OPTIONS)
def test_a_hostile_option_value_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, option, value):
    monkeypatch.chdir(tmp_path)
    argv = ["slurm", "smollm2_135m_math", "run.name=h", "--nodes", "1", "--gpus-per-node", "1", "--time", "10:00"]
    assert main([*argv, option, value]) == 2
    err = capsys.readouterr().err
    assert option in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not list(tmp_path.rglob("job.sbatch")) and not (tmp_path / "runs").exists()
    assert not list(tmp_path.rglob("SENTINEL"))


@pytest.mark.parametrize("where", ["run.output_dir", "run.output_dir, logs in --out-dir", "cwd"])
def test_a_hostile_path_in_the_script_is_one_line(tmp_path, monkeypatch, capsys, where):
    argv = ["slurm", "smollm2_135m_math", "run.name=h", "--nodes", "1", "--gpus-per-node", "1", "--time", "10:00"]
    if where.endswith("--out-dir"):  # then the run dir is named only in the script's first comment line
        argv += ["--out-dir", "jobs"]
    if where == "cwd":
        cwd = tmp_path / "a b\ntouch SENTINEL"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        expected = "the working directory (--chdir)"
    else:
        monkeypatch.chdir(tmp_path)
        argv.insert(2, "run.output_dir='x\ntouch SENTINEL'")
        expected = "run.output_dir"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.rglob("job.sbatch")) and not list(tmp_path.rglob("SENTINEL"))


def test_hostile_values_that_pass_validation_are_quoted_and_never_run(tmp_path, monkeypatch):
    """Overrides, the recipe file's path, the recipes dir, the interpreter and LOSIA_CACHE reach the
    script as they are (Hydra-quoted values may hold anything): bash must pass them on, never run them."""
    from losia_cli.resources import recipes_dir

    sentinel = tmp_path / "SENTINEL"
    hostile = "x\n$(>SENTINEL)`>SENTINEL`;>SENTINEL'\"\\"
    monkeypatch.chdir(tmp_path)
    python = _stub_bin(tmp_path / f"bin {hostile}")
    recipes = tmp_path / f"recipes {hostile}"
    shutil.copytree(recipes_dir(), recipes)
    assert main(["recipes", "cp", "smollm2_135m_math", "my $(>SENTINEL) `>SENTINEL`.yaml"]) == 0
    overrides = ["model.revision='$(>SENTINEL)'", "run.wandb_project='x\n>SENTINEL'", 'data.split="a\';>SENTINEL;\'"',
                 "run.output_dir='$(>SENTINEL)'"]
    monkeypatch.setenv("LOSIA_CACHE", str(tmp_path / f"cache {hostile}"))
    opts = _options(out_dir=tmp_path / "jobs$(>SENTINEL);`>SENTINEL`")
    words, cfg, _ = prepare("my $(>SENTINEL) `>SENTINEL`.yaml", overrides, opts, recipes)
    assert cfg.model.revision == "$(>SENTINEL)" and cfg.run.wandb_project == "x\n>SENTINEL"
    script = tmp_path / "job.sbatch"
    text = render(words, cfg, opts, opts.out_dir, recipes, python=str(python))
    script.write_text(text)
    _preamble_is_directives_only(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    job = _start_job(script, python.parent, tmp_path, "0")
    assert job.wait(timeout=60) == 0, job.stdout.read()
    assert not sentinel.exists() and not list(tmp_path.rglob("SENTINEL"))
    done = json.loads((tmp_path / "train.json").read_text())
    assert done["argv"][:5] == ["-m", "losia_cli.cli", "train", "--recipes", str(recipes)]
    assert done["argv"][5:5 + len(words)] == words  # every word arrives as it was validated
    assert words[0] == str(tmp_path / "my $(>SENTINEL) `>SENTINEL`.yaml")
    assert done["cache"] == str(tmp_path / f"cache {hostile}")


def test_the_cli_script_for_every_option_passes_bash_n(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "smollm2_135m_math", "run.name=all", "--nodes", "2", "--gpus-per-node", "4", "--time",
                 "1-02:03:04", "--partition", "gpu,gpu-long", "--account", "proj.a-1", "--job-name", "j.b+c",
                 "--cpus-per-task", "8", "--mem", "200G", "--exclusive", "--signal-seconds", "60",
                 "--out-dir", "jobs/x=1"]) == 0
    script = tmp_path / "jobs" / "x=1" / "job.sbatch"
    _preamble_is_directives_only(script.read_text())
    subprocess.run(["bash", "-n", str(script)], check=True)


# --- a real Slurm on loopback ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def slurm_cluster(tmp_path_factory):
    """munged + slurmctld + slurmd on 127.0.0.1, all state in a tmp dir; yields the client env."""
    missing = [d for d in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(d) is None]
    if missing:
        pytest.skip(f"Slurm not installed (missing {', '.join(missing)}; apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("the loopback Slurm runs its daemons as root")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "socket"
    conf = root / "slurm.conf"
    conf.write_text(textwrap.dedent(f"""\
        ClusterName=losiatest
        SlurmctldHost=localhost(127.0.0.1)
        SlurmctldPort={_free_port()}
        SlurmdPort={_free_port()}
        AuthType=auth/munge
        # cred_expire: a requeued job may start again this long after it stopped (default 120 s)
        AuthInfo=socket={sock},cred_expire=10
        CredType=cred/munge
        SlurmUser=root
        SlurmdUser=root
        StateSaveLocation={root}/state
        SlurmdSpoolDir={root}/spool
        SlurmctldPidFile={root}/slurmctld.pid
        SlurmdPidFile={root}/slurmd.pid
        SlurmctldLogFile={root}/log/slurmctld.log
        SlurmdLogFile={root}/log/slurmd.log
        MailProg=/bin/true
        ProctrackType=proctrack/linuxproc
        TaskPlugin=task/none
        SelectType=select/cons_tres
        SelectTypeParameters=CR_Core
        MpiDefault=none
        JobRequeue=1
        ReturnToService=2
        KillWait=60
        AccountingStorageType=accounting_storage/none
        JobAcctGatherType=jobacct_gather/none
        NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
        PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
        """))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = []
    try:
        for cmd in (
            ["munged", "-F", "--force", f"--key-file={key}", f"--socket={sock}",
             f"--pid-file={root}/munge/pid", f"--seed-file={root}/munge/seed", f"--log-file={root}/log/munged.log"],
            ["slurmctld", "-D", "-f", str(conf)],
            ["slurmd", "-D", "-N", "localhost", "-f", str(conf)],
        ):
            log = open(root / "log" / f"{cmd[0]}.out", "w")
            daemons.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            if cmd[0] == "munged":
                _wait_for(lambda: sock.exists(), 20, "munged socket")
        _wait_for(lambda: _slurm(env, "sinfo", "-h", "-o", "%T").strip() == "idle", 60, "the node to be idle")
        yield env
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
        for daemon in reversed(daemons):
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def _slurm(env, *cmd: str) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True).stdout


def _wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _job_state(env, job_id: str) -> str:
    m = re.search(r"JobState=(\S+)", _slurm(env, "scontrol", "show", "job", job_id))
    return m.group(1) if m else "GONE"


def _checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_real_slurm_requeue_resumes_the_run(slurm_cluster, tiny_llama_dir, tmp_path):
    """Submit a CPU training job, preempt it twice (the batch shell's USR1 trap, then an external
    `scontrol requeue`), and check that the run finishes as one run with every step logged once."""
    env = {**slurm_cluster, **OFFLINE}
    steps = 60
    submitted = subprocess.run(
        [sys.executable, "-m", "losia_cli.cli", "slurm", "smollm2_135m_math", f"model.name_or_path={tiny_llama_dir}",
         "data.max_length=64", "train.micro_batch_size=4", f"train.max_steps={steps}", "train.save_every=1",
         "train.warmup_ratio=0", "run.name=slurm-requeue", "--nodes", "1", "--gpus-per-node", "0",
         "--time", "10:00", "--submit"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    run_dir = tmp_path / "runs" / "slurm-requeue"
    log = run_dir / "slurm" / f"slurm-requeue-{job_id}.out"
    err = run_dir / "slurm" / f"slurm-requeue-{job_id}.err"
    try:
        # 1. The time-limit warning: USR1 to the batch shell, which forwards it and requeues.
        _wait_for(lambda: _checkpoints(run_dir), 180, "a first checkpoint")
        _slurm(env, "scancel", "--signal=USR1", "--batch", job_id)
        _wait_for(lambda: "resumed at step" in log.read_text(), 180, "the first resume")
        first_stop = int(re.findall(r"resumed at step (\d+)", log.read_text())[0])
        # 2. Preemption from outside: Slurm sends TERM to the whole job and requeues it.
        _wait_for(lambda: _checkpoints(run_dir)[-1] > first_stop, 180, "a checkpoint after the resume", poll=0.1)
        _slurm(env, "scontrol", "requeue", job_id)
        _wait_for(lambda: _job_state(env, job_id) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 300,
                  "the job to finish")
        text, errors = log.read_text(), err.read_text()
        assert _job_state(env, job_id) in ("COMPLETED", "GONE"), text + errors
        resumes = [int(s) for s in re.findall(r"resumed at step (\d+)", text)]
        assert len(resumes) == 2 and 0 < resumes[0] < resumes[1] < steps, text
        assert errors.count("checkpoint written; resume with run.resume=auto") == 2, errors
        report = json.loads((run_dir / "report.json").read_text())
        assert report["total_steps"] == steps
        logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert logged == list(range(1, steps + 1))  # records past each checkpoint were truncated
    finally:
        _slurm(env, "scancel", job_id)


# --- Hydra sweeps through submitit ------------------------------------------------------------------
def test_submitit_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from losia_cli.compose import compose

    cfg, _ = compose(["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2",
                      "hydra.launcher.gpus_per_node=8", "hydra.launcher.timeout_min=600"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.nodes == 2 and cfg.hydra.launcher.gpus_per_node == 8


@pytest.mark.slow
def test_submitit_local_sweep_trains_each_job(tiny_llama_dir, tmp_path):
    """`losia train -m hydra/launcher=submitit_local`: jobs run as submitit subprocesses; each job's
    run name is fixed at sweep launch (so a requeued submitit job resumes its own run dir)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    done = subprocess.run(
        [sys.executable, "-m", "losia_cli.cli", "train", "-m", "hydra/launcher=submitit_local",
         f"model.name_or_path={tiny_llama_dir}", "data.max_length=64", "train.micro_batch_size=4",
         "train.max_steps=2", "train.warmup_ratio=0", f"run.output_dir={tmp_path / 'runs'}", "method=lora,full",
         f"hydra.launcher.submitit_folder={tmp_path / 'submitit'}"],
        cwd=tmp_path, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "runs" / "multirun.yaml").is_file() and not (tmp_path / "multirun.yaml").exists()
    runs = {p.name: p for p in (tmp_path / "runs").iterdir() if p.is_dir()}
    names = {re.sub(r"-\d{8}-\d{6}-", "-STAMP-", name) for name in runs}
    assert names == {"smollm2_135m_math-lora-STAMP-0", "smollm2_135m_math-full-STAMP-1"}, runs
    stamps = {re.search(r"-(\d{8}-\d{6})-\d+$", name).group(1) for name in runs}
    assert len(stamps) == 1  # one stamp for the whole sweep, taken before the jobs start
    for run_dir in runs.values():
        assert json.loads((run_dir / "report.json").read_text())["total_steps"] == 2
        assert yaml_resume(run_dir) == "auto"  # a requeued job continues instead of refusing its dir


def yaml_resume(run_dir: Path):
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / "config.yaml").run.resume


# --- Docker -------------------------------------------------------------------------------------------
def test_dockerfile_installs_torch_first_then_the_package_under_constraints():
    """Guards "never let pip pick a torch": the CUDA torch goes in on its own, pinned like the
    constraints, and every later pip install uses the constraints file."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    installs = [" ".join(cmd.split()) for cmd in re.findall(r"pip install((?:[^\n\\]|\\\n)*)", text)]
    assert installs, "no pip install in the Dockerfile"
    assert re.search(rf"torch=={re.escape(pins['torch'])}\b", installs[0]) and "--index-url" in installs[0]
    assert all("-c constraints.txt" in cmd for cmd in installs[1:]) and len(installs) >= 2
    assert any(re.search(r"\.\[[^\]]*slurm", cmd) for cmd in installs[1:])
    assert re.search(r'^ENTRYPOINT \["losia"\]', text, flags=re.M)


def test_a_one_file_config_goes_to_the_job_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "cp", "smollm2_135m_math", "my.yaml"]) == 0
    words, cfg, _ = prepare("my.yaml", ["train.max_steps=3"], _options())
    assert words[0] == str(tmp_path / "my.yaml") and cfg.train.max_steps == 3 and cfg.recipe == "smollm2_135m_math"
