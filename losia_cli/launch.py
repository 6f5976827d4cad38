"""Multi-process launch: `losia train ... dist=ddp dist.num_processes=8` relaunches itself through
`accelerate launch` (like `tune run --nproc_per_node`), one worker per process, same overrides.

The parent stays alive to pass on preemption: Slurm signals the process it started (this one), and
the workers are the ones that must checkpoint (engine/preemption.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from losia_cli.config import RunConfig
from losia_cli.engine.preemption import PREEMPTED_EXIT_CODE, handling
from losia_cli.errors import ConfigError


def inside_launch() -> bool:
    """True in a worker started by accelerate/torchrun (or by the user's own launcher)."""
    return "WORLD_SIZE" in os.environ


def needs_launch(cfg: RunConfig) -> bool:
    if inside_launch():
        world = int(os.environ["WORLD_SIZE"])
        if world != cfg.dist.num_processes and cfg.dist.num_processes != 1:
            raise ConfigError(
                f"dist.num_processes={cfg.dist.num_processes} but this process was launched with "
                f"WORLD_SIZE={world}; set them alike (or leave dist.num_processes at 1 under your own launcher)"
            )
        return False
    return cfg.dist.num_processes > 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(cfg: RunConfig, overrides: list[str], recipes: Path | None) -> list[str]:
    dist = cfg.dist
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        # --multi_gpu only picks accelerate's torchrun-style launcher; the worker builds the real
        # set-up (DDP, FSDP or DeepSpeed; CPU or CUDA) from the config (engine/distributed.py).
        "--multi_gpu",
        "--num_processes", str(dist.num_processes),
        "--num_machines", str(dist.num_machines),
        "--machine_rank", str(dist.machine_rank),
        "--main_process_port", str(dist.main_process_port or (free_port() if dist.num_machines == 1 else 29500)),
        "--mixed_precision", "no",
        "--dynamo_backend", "no",
    ]
    if dist.main_process_ip:
        cmd += ["--main_process_ip", dist.main_process_ip]
    cmd += ["-m", "losia_cli.cli", "train", *overrides, f"run.name={cfg.run.name}"]
    if recipes:
        cmd += ["--recipes", str(recipes)]
    return cmd


def relaunch(cfg: RunConfig, overrides: list[str], recipes: Path | None) -> int:
    """Run the workers; return their exit status (PREEMPTED_EXIT_CODE after a passed-on signal)."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    launcher = subprocess.Popen(launch_command(cfg, overrides, recipes), env=env)
    forwarded: list[int] = []

    def pass_on(signum, frame):
        # Only to the workers: torchrun's agent would die on SIGUSR1 and tear the workers down.
        forwarded.append(signum)
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                child.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    with handling(pass_on):
        code = launcher.wait()
    return PREEMPTED_EXIT_CODE if forwarded and code != 0 else code
