"""`losia eval`: evaluate a run, model dir or hub id; options in the one key=value grammar."""

from __future__ import annotations

from pathlib import Path

from losia_cli.commands.common import command_parser
from losia_cli.commands.console import console
from losia_cli.compose import parse_options
from losia_cli.errors import UsageError
from losia_cli.eval.defaults import DEFAULT_SOURCES
from losia_cli.schema import EvalConfig

EXAMPLES = """\
examples:
  losia eval runs/demo tasks=[gsm8k@bundled:gsm8k_sample] limit=32
  losia eval package:smollm2-135m tasks=[humaneval] allow_code_exec=true
  losia eval runs/demo tasks=[boolq@bundled:boolq_sample] --baseline package:smollm2-135m
  losia eval runs/demo backend=lm_eval tasks=[arc_easy,hellaswag] num_fewshot=0 limit=100
  losia eval runs/demo backend=lm_eval tasks=[my_task] include_path=./my_tasks   # local harness YAMLs
tasks: TASK (with a default eval set: {defaults}) or TASK@SOURCE (any data.source)
options: {options}
"""


def add_parser(subparsers) -> None:
    options = " ".join(k for k in EvalConfig.model_fields if k != "after_train")
    examples = EXAMPLES.format(defaults=", ".join(DEFAULT_SOURCES), options=options)
    p = command_parser(subparsers, "eval", "evaluate a run, model dir or hub id on math / code / commonsense tasks",
                       examples, run)
    p.add_argument("target", help="run dir, model dir, .gguf, package:NAME or hub id")
    p.add_argument("options", nargs="*", help="key=value options (see below)")
    p.add_argument("--baseline", help="also evaluate this model; report per-task and forgetting deltas")
    p.add_argument("--out", type=Path, help="output dir (default: RUN/eval or runs/eval-*/eval)")


def run(args) -> int:
    from losia_cli.eval.command import load_target, run_eval

    cfg = parse_options(args.options, EvalConfig)
    cfg.require_work()
    if args.baseline and cfg.backend == "lm_eval":
        raise UsageError("--baseline works with the native backend only (backend=native)")
    model, tokenizer, identity, out_dir = load_target(args.target)
    baseline = load_target(args.baseline)[:2] if args.baseline else None
    run_eval(model, tokenizer, cfg, args.out or out_dir, identity, console, baseline)
    return 0
