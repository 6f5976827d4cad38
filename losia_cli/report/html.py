"""The HTML page of `losia report`: one file, PNGs inlined as data URIs, inline CSS, no scripts, so it
can be mailed or attached to an issue and opens anywhere without the files beside it."""

from __future__ import annotations

import base64
from datetime import datetime
from html import escape
from pathlib import Path

from losia_cli.engine.memory import PARTS
from losia_cli.report.runs import Run, summary

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: .6em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d0d5; padding: .3em .7em; text-align: right; }
th { background: #f2f2f5; } td:first-child, th:first-child { text-align: left; }
table.kv td, table.text td { text-align: left; } table.kv td:first-child { font-weight: 600; background: #fafafc; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #e3e3e8; }
figcaption { color: #555; font-size: .92em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .4em .8em; margin: .4em 0; }
code { background: #f2f2f5; padding: 0 .25em; border-radius: 3px; }
"""


def _num(value, spec: str = ",") -> str:
    if value is None:
        return "–"
    return format(value, spec)


def _bytes(value) -> str:
    if value is None:
        return "–"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def _table(header: list[str] | None, rows: list[list[str]], cls: str = "") -> str:
    """Cells are escaped here; callers pass plain text."""
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}{body}</table>'


SUMMARY_COLUMNS = ["run", "method", "trainable params", "optimizer state", "s/step p50", "s/step p95",
                   "tokens/s", "peak memory", "re-localization s", "loss first → final", "best val loss",
                   "wall time", "steps"]
# Figures of where the sub-networks sat: many and detailed, so folded away below the summary figures.
SUBNET_FIGURES = ("subnet_", "churn")


def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def _summary_row(run: Run) -> list[str]:
    s = summary(run)
    trainable = _num(s["trainable_params"])
    if s["trainable_params"] and s["total_params"]:
        trainable += f" ({100 * s['trainable_params'] / s['total_params']:.2f}%)"
    return [
        run.label, s["method"], trainable, _bytes(s["optimizer_state_bytes"]), _num(s["p50"], ".3f"),
        _num(s["p95"], ".3f"), _num(s["tokens_per_s"], ",.1f"), _bytes(s["peak_mem_bytes"]),
        _num(s["relocalization_time_s"], ".2f"), f"{_num(s['first_loss'], '.4f')} → {_num(s['final_loss'], '.4f')}",
        _num(s["best_val_loss"], ".4f"), _duration(s["wall_s"]), _num(s["steps"]),
    ]


def _config_rows(run: Run) -> list[list[str]]:
    c = run.config
    versions = c.get("versions") or {}

    def pairs(section: str, keys: tuple[str, ...]) -> str:
        values = c.get(section) or {}
        return " ".join(f"{k}={values[k]}" for k in keys if values.get(k) is not None)

    rows = [
        ["run dir", str(run.path)], ["recipe", c.get("recipe") or "–"],
        ["model", (c.get("model") or {}).get("name_or_path") or "–"], ["method", run.method],
        ["device", c.get("device") or "–"], ["data", pairs("data", ("source", "task", "max_length"))],
        ["train", pairs("train", ("lr", "micro_batch_size", "grad_accum", "precision", "max_steps"))],
        ["seed", _num(c.get("seed"), "")],
        ["versions", " ".join(f"{k} {v}" for k, v in versions.items() if v and k != "git_sha")],
        ["git sha", (versions.get("git_sha") or "–")[:12]],
    ]
    return [row for row in rows if row[1]]


def _continual(run: Run) -> str:
    cont = run.continual
    tasks = cont.get("tasks", [])
    rows = [["initial", *[_num(v, ".3f") for v in cont["initial"]]]] if cont.get("initial") else []
    for i, (stage, values) in enumerate(zip(cont.get("stages", []), cont.get("matrix", [])), 1):
        rows.append([f"after {i}: {stage.get('name', i)}", *[_num(v, ".3f") for v in values]])
    per_task = cont.get("per_task_forgetting") or {}
    metrics = cont.get("metrics", {})
    header = ["", *[f"{t} ({metrics.get(t, '?')})" for t in tasks]]
    return (
        f"<h2>Continual learning: {escape(run.label)}</h2>"
        + _table(header, rows)
        + _table(None, [["backward transfer (BWT)", _num(cont.get("backward_transfer"), "+.4f")],
                        ["forgetting", _num(cont.get("forgetting"), ".4f")],
                        *[[f"forgetting: {t}", _num(v, ".4f")] for t, v in per_task.items()]], "kv")
    )


def _evaluation(run: Run) -> str:
    """eval/results.json as a table: task, metric, value, stderr, n."""
    rows = [[task, metric, _num(value, ".4f"), _num((r.get("stderr") or {}).get(metric), ".4f"), _num(r.get("n"))]
            for task, r in (run.eval.get("tasks") or {}).items() for metric, value in (r.get("metrics") or {}).items()]
    return f"<h2>Evaluation: {escape(run.label)}</h2>" + _table(["task", "metric", "value", "± stderr", "n"], rows)


def _data_rows(run: Run) -> list[list[str]]:
    """The training data's statistics (report.json's `data`): rows, samples, tokens, mixture shares."""
    stats = (run.report or {}).get("data") or {}
    rows = [[key.removeprefix("n_").replace("_", " "), _num(value)] for key, value in stats.items()
            if key.startswith("n_") and isinstance(value, int)]
    rows += [[f"mixture: {source}", _num(n)] for source, n in stats.get("mixture") or []]
    return rows


MEMORY_PARTS = (*PARTS, "rest")


def _memory_rows(runs: list[Run]) -> list[list[str]]:
    """report.json's memory breakdown (engine/memory.py): each part with its share of the peak."""
    rows = []
    for run in runs:
        mem = (run.report or {}).get("memory_breakdown")
        if not mem:
            continue
        peak = mem["measured_peak"] or 1
        rows.append([run.label, _bytes(mem["measured_peak"]),
                     *[f"{_bytes(mem[k])} ({100 * mem[k] / peak:.0f}%)" for k in MEMORY_PARTS]])
    return rows


def _image(path: Path, name: str, caption: str) -> str:
    data = base64.b64encode((path / name).read_bytes()).decode("ascii")
    return (f'<figure id="{escape(name)}"><img alt="{escape(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption><code>{escape(name)}</code>: {escape(caption)}</figcaption></figure>")


def render(runs: list[Run], single: bool, images: list[tuple[str, str]], image_dir: Path) -> str:
    if single or not runs[0].metrics and runs[0].continual:  # one run, or one continual run and its stages
        title = f"losia report: {runs[0].label}"
    else:
        title = f"losia report: {len(runs)} runs"
    parts = [f"<h1>{escape(title)}</h1>",
             f'<p class="sub">generated {datetime.now():%Y-%m-%d %H:%M} from '
             f"{escape(', '.join(str(r.path) for r in runs))}</p>"]
    for run in runs:
        prefix = "" if single else f"{run.label}: "
        parts += [f'<p class="note">{escape(prefix + note)}</p>' for note in run.notes]
        if single and run.metrics and not run.subnets:
            note = (f"no sub-network records in subnets.jsonl (method {run.method} does not localize "
                    "sub-networks): subnet figures skipped")
            parts.append(f'<p class="note">{escape(note)}</p>')
    curve_runs = [r for r in runs if r.metrics]
    if curve_runs:
        parts += ["<h2>Summary</h2>", _table(SUMMARY_COLUMNS, [_summary_row(r) for r in curve_runs])]
    if single and curve_runs:
        parts += ["<h2>Configuration</h2>", _table(None, _config_rows(curve_runs[0]), "kv")]
    elif curve_runs:
        parts += ["<h2>Configurations</h2>", _table(
            ["run", "model", "device", "data", "train", "git sha"],
            [[r.label, *[dict(_config_rows(r)).get(k, "–") for k in ("model", "device", "data", "train", "git sha")]]
             for r in curve_runs], "text")]
    if single and curve_runs and _data_rows(curve_runs[0]):
        parts += ["<h2>Data</h2>", _table(None, _data_rows(curve_runs[0]), "kv")]
    if memory := _memory_rows(curve_runs):
        parts += ["<h2>Memory at the peak</h2>",
                  _table(["run", "peak", *[k.replace("_", " ") for k in MEMORY_PARTS]], memory),
                  '<p class="note">runtime: held before the model was loaded (interpreter, libraries, data; '
                  "CPU only); activations: tensors the first step saved for backward; rest: the peak minus "
                  "the parts (the step's temporaries, allocator slack, model loading)</p>"]
    parts += [_evaluation(r) for r in runs if r.eval]
    parts += [_continual(r) for r in runs if r.continual]
    main = [(n, c) for n, c in images if not n.startswith(SUBNET_FIGURES)]
    folded = [(n, c) for n, c in images if n.startswith(SUBNET_FIGURES)]
    if images:
        parts.append("<h2>Figures</h2>")
        parts += [_image(image_dir, name, caption) for name, caption in main]
    if folded:
        parts.append(f"<details><summary>Sub-network figures ({len(folded)})</summary>")
        parts += [_image(image_dir, name, caption) for name, caption in folded]
        parts.append("</details>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
