"""README.md model cards in the Hugging Face Hub's format for what losia writes: a run's `final/`,
`losia merge` dirs and `losia export` files. The YAML front matter (base_model, library_name, tags)
is what the Hub indexes; the body records how the weights were made, so a shipped model explains
itself: method, data, steps, final loss, eval scores when present, the exact command, versions."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import yaml

from losia_cli import atomic


# The Hub repos the packaged GGUF models were converted from, for the card's `base_model`.
PACKAGED_BASES = {"package:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
                  "package:gemma3-270m": "google/gemma-3-270m"}


def _read(path: Path, loader):
    """A run record, or None when the run has not written it (e.g. no eval yet)."""
    if not path.is_file():  # a link to a device or a FIFO would be read without end: taken as absent
        return None
    try:
        return loader(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _eval_lines(results: dict | None) -> list[str]:
    if not results or not results.get("tasks"):
        return ["No evaluation recorded (`losia eval RUN tasks=[...]` adds one)."]
    lines = ["| task | metric | value | n |", "|---|---|---|---|"]
    for task, result in results["tasks"].items():
        for metric, value in result.get("metrics", {}).items():
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else str(value)
            lines.append(f"| {task} | {metric} | {shown} | {result.get('n', '')} |")
    return lines


def model_card(run_dir: Path | None, *, base_model: str | None = None, library: str = "transformers",
               notes: list[str] = ()) -> str:
    """The card's text. `run_dir` supplies method, data, steps, loss and eval scores; `notes` are
    extra lines about this artifact (dtype, format, verification)."""
    from huggingface_hub import ModelCard, ModelCardData

    from losia_cli.provenance import versions

    config = _read(run_dir / "config.yaml", yaml.safe_load) if run_dir else None
    report = _read(run_dir / "report.json", json.loads) if run_dir else None
    results = _read(run_dir / "eval" / "results.json", json.loads) if run_dir else None
    config = config or {}
    method = config.get("method", {}).get("name")
    base_model = base_model or config.get("model", {}).get("name_or_path")
    base_model = PACKAGED_BASES.get(base_model, base_model)
    data = config.get("data", {})
    data_text = ", ".join(f"{k}={data[k]}" for k in ("task", "source", "split") if data.get(k)) or "unknown"
    train = config.get("train", {})
    objective = train.get("objective") if train.get("objective", "sft") != "sft" else None  # preference tuning
    card_data = ModelCardData(
        base_model=base_model if base_model and not base_model.startswith(("package:", "/", ".")) else None,
        library_name=library,
        tags=["losia", *([method, "fine-tuned"] if method else []), *([objective] if objective else [])],
    )
    facts = [
        f"- **method**: {method or 'none (exported as loaded)'}",
        f"- **base model**: {base_model or 'unknown'}",
        f"- **data**: {data_text}",
    ]
    if objective:
        knobs = ("beta", "label_smoothing") + (("simpo_gamma",) if objective == "simpo" else ())
        facts.append(f"- **objective**: {objective} (" + ", ".join(f"{k}={train.get(k)}" for k in knobs) + ")")
    if report:
        facts += [f"- **steps**: {report.get('total_steps')}",
                  f"- **final loss**: {report.get('final_loss'):.4f}" if report.get("final_loss") is not None
                  else "- **final loss**: unknown"]
    facts += [f"- {note}" for note in notes]
    where = [f"The run's full config: `{run_dir.resolve() / 'config.yaml'}`.", ""] if config else []
    body = [
        f"# {Path(str(base_model or 'model')).name}" + (f" + {method}" if method else ""), "",
        "Made with the `losia` CLI (LoSiA, arXiv 2507.04487, and baselines).", "",
        "## Training", "", *facts, "",
        "## Evaluation", "", *_eval_lines(results), "",
        "## Command", "", "The command that wrote these files:", "", "```", shlex.join(["losia", *sys.argv[1:]]),
        "```", "", *where,
        "## Versions", "", "```", yaml.safe_dump(versions(), sort_keys=False).strip(), "```", "",
    ]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body)))


def write_model_card(path: Path, run_dir: Path | None, **kwargs) -> Path:
    """Write the card to `path` (a dir gets `README.md`), atomically. An adapter dir (PEFT methods'
    `final/`) is a peft model on the Hub; this card replaces the stub peft writes there."""
    path = Path(path)
    target = path / "README.md" if path.is_dir() else path
    if (path / "adapter_config.json").is_file():
        kwargs["library"] = "peft"
    atomic.write_text(target, model_card(Path(run_dir) if run_dir else None, **kwargs))
    return target
