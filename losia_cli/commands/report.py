"""`losia report`: figures and one self-contained HTML page for one run, or several overlaid."""

from __future__ import annotations

from pathlib import Path

from losia_cli.commands.common import command_parser
from losia_cli.commands.console import console

EXAMPLES = """\
examples:
  losia report runs/demo                                 # -> runs/demo/report/report.html + PNGs
  losia report runs/demo-losia_pro runs/demo-lora --out report-compare   # overlay several runs
  losia report runs/continual-demo                       # accuracy matrix, BWT and forgetting
"""


def add_parser(subparsers) -> None:
    p = command_parser(subparsers, "report",
                       "figures and one self-contained HTML page for one run, or several overlaid", EXAMPLES, run)
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help="output dir (default: RUN_DIR/report; ./report-compare for several)")


def run(args) -> int:
    from losia_cli.report import build_report

    page = build_report(args.run_dirs, args.out)
    console.print(f"[green]report[/] -> {page} (open it in a browser; PNGs beside it)")
    return 0
