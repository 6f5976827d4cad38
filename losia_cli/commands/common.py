"""What the command modules share: the parser pieces every command has and the error line. Plain
Python only: `losia bench` runs where rich is not installed (the consoles are in commands/console.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from losia_cli.errors import LosiaError, cannot_write


def print_error(message: str) -> None:
    """The one line a user mistake gets (bold red `error:` on a terminal).

    A message quotes what the user gave (a file name, a value); a newline or escape code in it is shown
    escaped, as repr() writes it, so the message stays one line and cannot drive the terminal."""
    label = "\033[1;31merror:\033[0m" if sys.stderr.isatty() else "error:"
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    print(label, line, file=sys.stderr)


def error_line(e: Exception, debug: bool) -> str | None:
    """The one line an exception prints as (a LosiaError's message, a full disk), or None when it is a
    bug or --debug is on: then the caller re-raises and the traceback shows."""
    if debug:
        return None
    return str(e) if isinstance(e, LosiaError) else cannot_write(e)


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
