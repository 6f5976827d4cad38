"""`losia report`: PNG figures and one self-contained HTML page for a run dir, or several overlaid.
runs.py reads the run dirs, figures.py draws, html.py writes the page."""

from __future__ import annotations

from pathlib import Path

from losia_cli import atomic
from losia_cli.errors import ReportError
from losia_cli.report.figures import figures
from losia_cli.report.html import render
from losia_cli.report.runs import label_runs, load_run, stage_runs


def default_out(paths: list[Path]) -> Path:
    return Path(paths[0]) / "report" if len(paths) == 1 else Path("report-compare")


def build_report(paths: list[Path], out: Path | None = None) -> Path:
    """Write the PNGs and report.html into `out` (atomically); returns the HTML's path."""
    runs = [load_run(p) for p in paths]
    single = len(runs) == 1
    if single and not runs[0].metrics and runs[0].continual:
        # A continual parent dir: its stages are the runs to overlay and tabulate.
        stages = stage_runs(runs[0])
        runs, single = runs + stages, False
    label_runs(runs)
    out = Path(out) if out is not None else default_out(paths)
    if reason := atomic.foreign(out):
        raise ReportError(f"--out: {reason}; not replacing it, choose another --out")
    drawn = figures(runs, single)
    with atomic.directory(out, overwrite=True, listed=True) as tmp:
        images = []
        for name, caption, fig in drawn:
            fig.savefig(tmp / name, metadata={"Software": None})
            images.append((name, caption))
        atomic.write_text(tmp / "report.html", render(runs, single, images, tmp))
    return out / "report.html"
