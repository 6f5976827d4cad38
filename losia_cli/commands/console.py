"""The rich consoles of the commands that print tables, progress and markup (all but `losia bench`)."""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
