"""`losia` command line: argument parsing and dispatch to one module per sub-command
(losia_cli/commands/); composition lives in compose.py, training in engine/."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from losia_cli.commands.common import error_line, print_error

# One module per command (losia_cli/commands/), imported only when needed: `losia bench` on a bare
# GPU image must not pull in the training stack (datasets, accelerate's launcher, ...).
COMMANDS = ("train", "recipes", "merge", "eval", "chat", "export", "compare", "bench", "report", "slurm")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with `only` just that command's part of it."""
    parser = argparse.ArgumentParser(
        prog="losia",
        description="Fine-tune LLMs with LoSiA / LoSiA-Pro and the paper's baselines, from YAML recipes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        importlib.import_module(f"losia_cli.commands.{name}").add_parser(subparsers)
    if only is None:
        parser.epilog = importlib.import_module("losia_cli.commands.train").EXAMPLES
    return parser


def _quiet_libraries(debug: bool, command: str) -> None:
    """losia prints its own progress; library progress bars and info logs only add noise."""
    if debug:
        return
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: before transformers
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # bitsandbytes (pulled in by galore-torch, imported by peft) warns about optional CPU kernels.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if command == "recipes":  # YAML only: `losia recipes ls` must not pay for importing torch
        return
    import torch
    from transformers.utils import logging as hf_logging

    if not torch.cuda.is_available():  # else DeepSpeed warns at import that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from losia_cli.engine.preemption import PREEMPTED_EXIT_CODE, Preempted

    debug = args.debug or os.environ.get("HYDRA_FULL_ERROR") == "1"
    _quiet_libraries(debug, args.command)
    try:
        return args.run(args)
    except Preempted as e:
        print(e, file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except Exception as e:  # a user mistake or a full disk: one line; anything else: the traceback
        if not (line := error_line(e, debug)):
            raise
        print_error(line)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        # A worker must close its process group while the interpreter is alive: one that exits
        # with gloo's threads still holding work can die in SIGABRT ("terminate called without an
        # active exception") after the run itself succeeded (see also the worker exit below).
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    # Through the importable module, not __main__: submitit pickles sweep jobs (commands.train.SweepJob) by name.
    from losia_cli.cli import main as cli_main

    code = cli_main()
    if "LOCAL_RANK" in os.environ:
        # A worker of `accelerate launch` (losia_cli/launch.py): its run is over, its files synced and
        # its loggers closed. It leaves without the interpreter's teardown, where gloo's threads still
        # holding work can abort a finished rank (SIGABRT, "terminate called without an active
        # exception"; pytorch/pytorch#179291), failing the launch after a good run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
