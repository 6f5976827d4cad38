"""`losia slurm`: write (and optionally submit) an sbatch script that trains a recipe on N nodes.

One `losia train` launcher per node (`srun`, one task per node); each relaunches itself over its
GPUs through `accelerate launch` (launch.py) with the node's rank and the first node as rendezvous.
The run name is fixed here, once, so a requeued job (time limit, preemption) continues the same run
dir with `run.resume=auto`:

    Slurm sends USR1 (--signal=B:USR1@S, S seconds before the time limit) or TERM (preemption,
    scontrol requeue) -> the batch shell passes it to the training -> it checkpoints at the next step
    and exits 75 -> the batch shell runs `scontrol requeue` -> the job starts again and resumes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from losia_cli import atomic
from losia_cli.engine.preemption import PREEMPTED_EXIT_CODE  # checkpoint written: requeue me
from losia_cli.errors import SlurmError

# Set by the script on every node; the user cannot override them (they come from the allocation).
MANAGED_KEYS = ("run.resume", "dist.num_processes", "dist.num_machines", "dist.machine_rank",
                "dist.main_process_ip", "dist.main_process_port")


@dataclass
class SlurmOptions:
    nodes: int
    gpus_per_node: int
    time: str
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    out_dir: Path | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    exclusive: bool = False
    signal_seconds: int = 120
    submit: bool = False


def time_limit_seconds(value: str) -> int:
    """Seconds of a Slurm --time value: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    # Matched as given, not stripped: the value goes into the script as it is.
    m = re.fullmatch(r"(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?", value)
    if not m:
        raise SlurmError(f"--time {value!r}: use HH:MM:SS, MM, MM:SS or D-HH[:MM[:SS]]")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-H[:M[:S]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds <= 0:
        raise SlurmError(f"--time {value!r}: must be more than zero")
    return seconds


def _check_options(opts: SlurmOptions) -> None:
    if opts.nodes < 1:
        raise SlurmError(f"--nodes {opts.nodes}: need at least one node")
    if opts.gpus_per_node < 0:
        raise SlurmError(f"--gpus-per-node {opts.gpus_per_node}: use 0 for a CPU job")
    if opts.cpus_per_task is not None and opts.cpus_per_task < 1:
        raise SlurmError(f"--cpus-per-task {opts.cpus_per_task}: need at least one")
    limit = time_limit_seconds(opts.time)
    if not 0 < opts.signal_seconds < limit:
        raise SlurmError(f"--signal-seconds {opts.signal_seconds}: must be between 1 and the time limit "
                         f"({limit} s), to leave time for the checkpoint")
    if opts.job_name and not re.fullmatch(r"[\w.+-]+", opts.job_name, flags=re.ASCII):
        raise SlurmError(f"--job-name {opts.job_name!r}: letters, digits and . _ + - only")
    if opts.mem and not re.fullmatch(r"[0-9]+[KMGT]?", opts.mem):
        raise SlurmError(f"--mem {opts.mem!r}: a size in megabytes, or with a unit K, M, G or T (e.g. 200G)")
    for option, value in (("--partition", opts.partition), ("--account", opts.account)):
        if value and not re.fullmatch(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*", value):
            raise SlurmError(f"{option} {value!r}: a name (or a comma-separated list) of letters, digits "
                             "and . _ + - only")


# A #SBATCH line is a comment to bash, ended by a newline, and sbatch splits its value at white space
# and reads quotes and backslashes: a value that goes there is one plain word, never quoted.
_DIRECTIVE_WORD = re.compile(r"[^\s\"'\\]+")


def _check_directive(option: str, value: str) -> None:
    if not (_DIRECTIVE_WORD.fullmatch(value) and value.isprintable()):
        raise SlurmError(f"{option} {value!r}: must be one word without spaces, quotes, backslashes or "
                         "control characters (it goes into a #SBATCH line)")


def _check_paths(cfg, slurm_dir: Path, out_dir_given: bool) -> None:
    """The paths the script names outside shell quoting: --chdir, --output/--error and its comment line."""
    _check_directive("the working directory (--chdir)", str(Path.cwd()))
    _check_directive("--out-dir" if out_dir_given else "run.output_dir (the logs go to RUN_DIR/slurm)", str(slurm_dir))
    if not str(cfg.run_dir()).isprintable():  # only in a comment line: spaces are harmless there
        raise SlurmError(f"run.output_dir {cfg.run.output_dir!r}: must not hold control characters (newlines)")


def _recipe_override(recipe: str) -> str:
    """recipe=NAME, or a one-file config by its absolute path (the job may start elsewhere)."""
    from losia_cli.compose import is_config_file

    if is_config_file(recipe):
        return str(Path(recipe).resolve())
    return recipe if recipe.startswith("recipe=") else f"recipe={recipe}"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _user_overrides(overrides: list[str]) -> list[str]:
    for item in overrides:
        if "=" not in item:
            raise SlurmError(f"expected key=value, got {item!r}")
        if _key(item) in MANAGED_KEYS and item != "run.resume=auto":
            raise SlurmError(f"{_key(item)} is set by the job script (run.resume=auto; dist.* from --nodes "
                             "and --gpus-per-node); leave it out")
    return [item for item in overrides if _key(item) != "run.resume"]


def prepare(recipe: str, overrides: list[str], opts: SlurmOptions, recipes: Path | None = None):
    """Validate everything the job will run; return (train overrides, run config, total processes).

    Validation happens here, on the login node, so a typo fails now and not after hours in the queue.
    """
    from losia_cli.compose import load_config
    from losia_cli.engine.rundir import name_run

    _check_options(opts)
    words = [_recipe_override(recipe), *_user_overrides(overrides)]
    cfg = name_run(load_config(words, recipes))  # fixes run.name: every restart uses this run dir
    words = [w for w in words if _key(w) != "run.name"]  # added once, below
    total = opts.nodes * max(opts.gpus_per_node, 1)
    if cfg.dist.name == "single" and total > 1:
        words.append("dist=ddp")  # `single` is one process; more than one needs data parallelism
    words += [f"run.name={cfg.run.name}", "run.resume=auto"]
    # The same config the nodes will see (rank 0's), so a bad dist setting fails here too.
    cfg = load_config([*words, *_dist_overrides(total, opts.nodes, "0", "127.0.0.1", "29500")], recipes, quiet=True)
    if (cfg.run_dir() / "report.json").exists():
        raise SlurmError(f"{cfg.run_dir()} holds a finished run (report.json); choose another run.name")
    return words, cfg, total


def _dist_overrides(total, nodes, rank, ip, port) -> list[str]:
    # `++` adds the key where a dist preset does not list it (they are optional fields).
    return [f"++dist.num_processes={total}", f"++dist.num_machines={nodes}", f"++dist.machine_rank={rank}",
            f"++dist.main_process_ip={ip}", f"++dist.main_process_port={port}"]


def render(words: list[str], cfg, opts: SlurmOptions, slurm_dir: Path, recipes: Path | None = None,
           python: str = sys.executable) -> str:
    """The sbatch script text. Paths are absolute: the job may start from another directory.

    `python` is this interpreter by default, so the job runs in the environment that validated it.
    Every value is either checked to be one plain word here or in _check_options, or shell-quoted."""
    _check_paths(cfg, slurm_dir, opts.out_dir is not None)
    name = opts.job_name or cfg.run.name
    sbatch = [
        f"--job-name={name}",
        f"--nodes={opts.nodes}",
        "--ntasks-per-node=1",  # one launcher per node; it starts one process per GPU
        *([f"--gpus-per-node={opts.gpus_per_node}"] if opts.gpus_per_node else []),
        *([f"--cpus-per-task={opts.cpus_per_task}"] if opts.cpus_per_task else []),
        *([f"--mem={opts.mem}"] if opts.mem else []),
        *(["--exclusive"] if opts.exclusive else []),
        f"--time={opts.time}",
        *([f"--partition={opts.partition}"] if opts.partition else []),
        *([f"--account={opts.account}"] if opts.account else []),
        "--requeue",
        f"--signal=B:USR1@{opts.signal_seconds}",  # B: to the batch shell, which passes it on
        f"--chdir={Path.cwd()}",  # relative run.output_dir / data paths resolve as they did here
        f"--output={slurm_dir / '%x-%j.out'}",
        f"--error={slurm_dir / '%x-%j.err'}",
        "--open-mode=append",  # a requeued job appends to the same log instead of truncating it
    ]
    train = [python, "-m", "losia_cli.cli", "train"]
    if recipes:
        train += ["--recipes", str(Path(recipes).resolve())]
    train += words
    procs = f"$((SLURM_NNODES * {opts.gpus_per_node}))" if opts.gpus_per_node else '"$SLURM_NNODES"'
    # Evaluated by bash on each node (inside srun), hence single quotes here and "$@" for the rest.
    per_node = " ".join(_dist_overrides(procs, '"$SLURM_NNODES"', '"$SLURM_NODEID"', '"$MASTER_ADDR"',
                                        '"$MASTER_PORT"'))
    srun = ["srun", "--ntasks-per-node=1"]
    if opts.cpus_per_task:
        srun.append(f"--cpus-per-task={opts.cpus_per_task}")  # srun does not inherit it (Slurm >= 22.05)
    cache = os.environ.get("LOSIA_CACHE")
    lines = [
        "#!/bin/bash",
        f"# Written by `losia slurm` for run {cfg.run.name} ({cfg.run_dir()}). Submit: sbatch {slurm_dir / 'job.sbatch'}",
        *(f"#SBATCH {opt}" for opt in sbatch),
        "",
        "set -euo pipefail",
        'echo "losia: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST (restart count ${SLURM_RESTART_COUNT:-0})"',
        "# The first node is the rendezvous. sed, not head -n1: head exits early and, under pipefail,",
        "# scontrol's SIGPIPE on a long node list would fail the job.",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))  # per job: two jobs on one node do not collide",
        "export MASTER_ADDR MASTER_PORT",
        "export PYTHONUNBUFFERED=1  # the log is a file: write lines as they come (tail -f, after a kill)",
        *([f"export LOSIA_CACHE={shlex.quote(cache)}"] if cache else []),
        "",
        "TRAIN=(" + " ".join(shlex.quote(w) for w in train) + ")",
        "",
        "# srun in the background so this shell can take signals while it waits.",
        " ".join(srun) + " bash -c " + shlex.quote(f'exec "$@" {per_node}') + ' losia "${TRAIN[@]}" &',
        "pid=$!",
        "signalled=0",
        "# Time limit (USR1) or preemption (TERM): pass it on; the training checkpoints and exits 75.",
        'forward() { signalled=1; echo "losia: got SIG$1, passing it to the training"; kill -s "$1" "$pid" 2>/dev/null || true; }',
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        "status=0",
        'wait "$pid" || status=$?',
        'while [ "$signalled" = 1 ]; do  # wait returned for the trap; wait again for the real exit',
        '  signalled=0; status=0; wait "$pid" || status=$?',
        "done",
        f'if [ "$status" -eq {PREEMPTED_EXIT_CODE} ]; then',
        '  echo "losia: checkpoint written; requeueing job $SLURM_JOB_ID (it resumes with run.resume=auto)"',
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi  # a failed requeue (e.g. Slurm already requeues it) keeps the 75",
        'exit "$status"',
        "",
    ]
    return "\n".join(lines)


def slurm(recipe: str, overrides: list[str], opts: SlurmOptions, console, recipes: Path | None = None) -> Path:
    """Write the job script (and submit it with opts.submit); return its path."""
    words, cfg, total = prepare(recipe, overrides, opts, recipes)
    slurm_dir = Path(opts.out_dir or cfg.run_dir() / "slurm").resolve()
    text = render(words, cfg, opts, slurm_dir, recipes)
    slurm_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output dir
    script = slurm_dir / "job.sbatch"
    atomic.write_text(script, text)
    script.chmod(0o777 & ~atomic.umask())  # executable, and as private as the user's other files
    per_node = f"{opts.gpus_per_node} GPU(s)" if opts.gpus_per_node else "CPU"
    console.print(f"wrote {script}: {opts.nodes} node(s) x {per_node}, {total} process(es), "
                  f"run dir {cfg.run_dir()}", markup=False)
    if opts.submit:
        job_id = submit(script)
        log = slurm_dir / f"{opts.job_name or cfg.run.name}-{job_id}.out"
        console.print(f"submitted job {job_id}; log: {log}", markup=False)
    return script


def submit(script: Path) -> str:
    if shutil.which("sbatch") is None:
        raise SlurmError(f"sbatch not found on PATH; run `sbatch {script}` on a Slurm login node")
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise SlurmError(f"sbatch refused {script}: {lines[-1] if lines else f'exit {done.returncode}'}")
    return done.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
