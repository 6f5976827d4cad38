"""What the command modules share: the consoles and the parser pieces every command has."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    err_console.print("[bold red]error:[/]", escape(message))


def command_parser(subparsers, name: str, help: str, examples: str, run) -> argparse.ArgumentParser:
    """A sub-command's parser; it also takes --debug after the command (`losia train --debug`)."""
    parser = subparsers.add_parser(name, help=help, epilog=examples,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    # SUPPRESS: without the flag here, `losia --debug train` keeps the top-level value.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    parser.set_defaults(run=run)
    return parser


def add_recipes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipes", type=Path, help="use this recipe tree instead of the bundled one")
