"""`losia slurm`: write (and --submit) an sbatch job that trains a recipe on N nodes, requeue-safe."""

from __future__ import annotations

from pathlib import Path

from losia_cli.commands.common import add_recipes_option, command_parser
from losia_cli.commands.console import console

EXAMPLES = """\
examples:
  losia slurm smollm2_135m_math --nodes 1 --gpus-per-node 1 --time 01:00:00      # writes runs/<name>/slurm/job.sbatch
  losia slurm llama2_7b_math method=lora --nodes 2 --gpus-per-node 8 --time 12:00:00 --partition gpu --submit
  losia slurm gemma2b_math dist=zero2 run.name=g2b --nodes 4 --gpus-per-node 4 --time 2-00:00:00 --submit
  losia slurm smollm2_135m_math --nodes 1 --gpus-per-node 0 --cpus-per-task 8 --time 30:00   # a CPU job
  losia slurm my.yaml --nodes 2 --gpus-per-node 8 --time 12:00:00   # a one-file config (losia recipes cp)
A requeued job (time limit, preemption) resumes the same run dir from its latest checkpoint.
"""


def add_parser(subparsers) -> None:
    p = command_parser(subparsers, "slurm", "write (and --submit) an sbatch job that trains a recipe on N nodes, "
                       "requeue-safe", EXAMPLES, run)
    p.add_argument("recipe", help="recipe name (as in recipe=NAME) or a one-file config (my.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for losia train")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0 for a CPU job")
    p.add_argument("--time", required=True, help="time limit, HH:MM:SS (or any Slurm --time format)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name", help="default: the run name")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node (one task per node)")
    p.add_argument("--mem", help="memory per node, e.g. 200G")
    p.add_argument("--exclusive", action="store_true", help="whole nodes only")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="warn the job this long before the time limit, to checkpoint (default 120)")
    p.add_argument("--out-dir", type=Path, help="where job.sbatch and the logs go (default: RUN_DIR/slurm)")
    p.add_argument("--submit", action="store_true", help="run sbatch and print the job id")
    add_recipes_option(p)


def run(args) -> int:
    from losia_cli.slurm import SlurmOptions, slurm

    opts = SlurmOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time, partition=args.partition,
        account=args.account, job_name=args.job_name, out_dir=args.out_dir, cpus_per_task=args.cpus_per_task,
        mem=args.mem, exclusive=args.exclusive, signal_seconds=args.signal_seconds, submit=args.submit,
    )
    slurm(args.recipe, args.overrides, opts, console, args.recipes)
    return 0
