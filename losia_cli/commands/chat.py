"""`losia chat` and `losia generate`: talk to a trained model, or answer a file of prompts."""

from __future__ import annotations

import argparse
from pathlib import Path

from losia_cli.commands.common import command_parser
from losia_cli.commands.console import console, err_console

CHAT_EXAMPLES = """\
examples:
  losia chat runs/demo                                   # /reset starts over, /exit quits
  echo "What is 7*8?" | losia chat package:smollm2-135m --max-new-tokens 32
  losia chat runs/demo --system "You are terse." --temperature 0.7 --top-p 0.9
"""

GENERATE_EXAMPLES = """\
examples:
  losia generate runs/demo prompts.jsonl --out replies.jsonl      # rows: {"prompt": "...", "id": ...}
  losia generate package:smollm2-135m prompts.jsonl --out r.jsonl --batch-size 16 --temperature 0.7
Run it again to resume: prompts already in --out (by id, else by prompt text) are skipped.
"""

TARGET_HELP = "run dir, model dir, .gguf, package:NAME or hub id"


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="system prompt")
    p.add_argument("--chat-template", help="Jinja chat template (file or string) if the model has none")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def add_parser(subparsers) -> None:
    p = command_parser(subparsers, "chat", "talk to a run, model dir or hub id (streams; off a TTY: one turn per "
                       "stdin line)", CHAT_EXAMPLES, run_chat)
    p.add_argument("target", help=TARGET_HELP)
    _sampling_arguments(p)

    p = command_parser(subparsers, "generate", "answer a JSONL file of prompts, batched and resumable",
                       GENERATE_EXAMPLES, run_generate)
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("prompts", type=Path, help='JSONL, one {"prompt": ..., "id"?: ...} per line')
    p.add_argument("--out", type=Path, required=True, help="JSONL replies (appended; resumable)")
    p.add_argument("--batch-size", type=int, default=8)
    _sampling_arguments(p)


def _sampling(args):
    from losia_cli.chat import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed, batch_size=getattr(args, "batch_size", 8))


def _load(args):
    from losia_cli.chat import set_chat_template
    from losia_cli.eval.command import load_target

    model, tokenizer, _, _ = load_target(args.target)
    set_chat_template(tokenizer, args.chat_template)
    return model, tokenizer


def run_chat(args) -> int:
    from losia_cli.chat import chat

    sampling = _sampling(args)  # bad options fail before the model loads
    model, tokenizer = _load(args)
    chat(model, tokenizer, sampling, system=args.system)
    return 0


def run_generate(args) -> int:
    from losia_cli.chat import generate_file, read_prompts

    sampling = _sampling(args)
    read_prompts(args.prompts)  # bad options and rows fail before the model loads
    model, tokenizer = _load(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done, skipped = generate_file(model, tokenizer, args.prompts, args.out, sampling, system=args.system,
                                  console=err_console)
    console.print(f"[green]generated[/] {done} replies ({skipped} already answered) -> {args.out}")
    return 0
