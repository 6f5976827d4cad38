"""Compatibility matrix: every method on a tiny random model of each transformers family, through the
commands a user runs: train (2 steps) -> resume (from step 1, same final weights) -> merge (verified)
-> chat one turn -> eval. Offline, CPU; SmolLM2's tokenizer from the packaged model.

    python benchmarks/compat/matrix.py                             # every family, every method
    python benchmarks/compat/matrix.py phi3 mixtral --methods losia_pro,lora
    python benchmarks/compat/matrix.py --out benchmarks/results/compat_matrix.md
    python benchmarks/compat/matrix.py gpt2 phi3 --cache /tmp/rows      # the same in pieces: families
    python benchmarks/compat/matrix.py --cache /tmp/rows --out ...      # already in --cache are reused

Each cell is `ok`, or the one line the command printed when it refused (exit 2), or `TRACEBACK`
with the exception (a bug). Families are transformers config names (`model_type`): any decoder-only
family transformers ships can be named; FAMILIES holds the sizes that some of them need.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

METHODS = ["losia_pro", "losia", "lora", "dora", "pissa", "galore", "full"]
# Shape of every tiny model (2 decoder layers, hidden 64); per-family keys below (None: not set).
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma": {}, "gemma2": {}, "gemma3_text": {},
    "phi3": {}, "gpt2": {"n_positions": 256}, "falcon": {"head_dim": None}, "gpt_neox": {}, "starcoder2": {}, "olmo2": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
}
STAGES = ["train", "resume", "merge", "chat", "eval"]


@dataclass
class Row:
    family: str
    method: str
    cells: dict[str, str] = field(default_factory=dict)
    targets: str = ""

    @property
    def ok(self) -> bool:
        return all(self.cells.get(stage) == "ok" for stage in STAGES)


def build_model(family: str, tokenizer_dir: Path, out: Path) -> Path:
    """A tiny random model of `family` with SmolLM2's tokenizer, saved as a Hugging Face dir."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = {key: value for key, value in {**COMMON, **FAMILIES.get(family, {})}.items() if value is not None}
    config = AutoConfig.for_model(
        family, **shape, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def losia(*argv: str, stdin: str = "") -> tuple[str, str]:
    """Run one losia command in this process: ("ok" or the refusal line or TRACEBACK ..., its output)."""
    from losia_cli.cli import main

    out = io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(list(argv))
    except Exception as e:  # noqa: BLE001 - a traceback is what the matrix exists to catch
        return f"TRACEBACK {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", out.getvalue()
    finally:
        sys.stdin = old_stdin
    text = out.getvalue()
    if code == 0:
        return "ok", text
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    return (lines[-1].removeprefix("error: ") if lines else f"exit {code}"), text


def same_weights(a: Path, b: Path) -> bool:
    """Whether two final/ dirs hold bit-identical tensors."""
    from safetensors.torch import load_file

    def tensors(path: Path) -> dict:
        found = {}
        for file in sorted(path.glob("*.safetensors")):
            found.update(load_file(file))
        return found

    left, right = tensors(a), tensors(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def run_method(family: str, model_dir: Path, method: str, work: Path) -> Row:
    row = Row(family, method)
    common = [f"model.name_or_path={model_dir}", f"method={method}", "data.max_length=64",
              "train.micro_batch_size=2", "train.max_steps=2", "train.save_every=1", "train.warmup_ratio=0",
              f"run.output_dir={work}"]
    if method in ("losia", "losia_pro"):
        common.append("method.period=1")  # a re-localization inside the two steps
    if method == "galore":
        common.append("method.rank=4")
    first = work / f"{family}-{method}"
    row.cells["train"], text = losia("train", *common, f"run.name={first.name}")
    if row.cells["train"] != "ok":
        return row
    if "targets: trains " not in text:
        row.cells["train"] = "the start line does not say what trains"
        return row
    row.targets = trained_kinds(json.loads((first / "report.json").read_text())["targets"])
    resumed = work / f"{first.name}-resumed"
    row.cells["resume"], _ = losia("train", *common, f"run.name={resumed.name}",
                                   f"run.resume={first / 'checkpoints' / 'step-1'}")
    if row.cells["resume"] == "ok" and not same_weights(first / "final", resumed / "final"):
        row.cells["resume"] = "final weights differ from the uninterrupted run"
    merged = work / f"{first.name}-merged"
    row.cells["merge"], _ = losia("merge", str(first), "--out", str(merged))
    if row.cells["merge"] != "ok":
        return row
    row.cells["chat"], text = losia("chat", str(merged), "--max-new-tokens", "4", stdin="What is 2+3?\n")
    row.cells["eval"], _ = losia("eval", str(merged), "tasks=[gsm8k@bundled:gsm8k_sample]", "limit=2",
                                 "max_new_tokens=4", "forgetting=false", "--out", str(work / f"{first.name}-eval"))
    return row


def trained_kinds(targets: dict) -> str:
    """report.json's `targets` in a table cell: trained kinds (matrices), then the kinds left out."""
    if targets.get("all"):
        return "every parameter"
    text = f"{', '.join(targets['kinds'])} ({targets['matrices']} matrices)"
    if targets.get("note"):
        text += f", {targets['note']}"
    left = [item["kind"] for item in targets["left_out"]]
    return text + (f"; left out: {', '.join(left)}" if left else "")


def run_family(family: str, methods: list[str], work: Path, tokenizer_dir: Path) -> list[Row]:
    try:
        model_dir = build_model(family, tokenizer_dir, work / "models" / family)
    except Exception as e:  # noqa: BLE001 - a family transformers cannot build this way
        row = Row(family, "-", {"train": f"cannot build a tiny {family}: {type(e).__name__}: {e}"})
        return [row]
    return [run_method(family, model_dir, method, work) for method in methods]


def markdown(rows: list[Row], command: str) -> str:
    """The summary (family x method: ok or the first stage that is not) and the detail table."""
    methods = list(dict.fromkeys(r.method for r in rows))
    families = list(dict.fromkeys(r.family for r in rows))
    by = {(r.family, r.method): r for r in rows}

    def summary(row: Row | None) -> str:
        if row is None:
            return "-"
        if row.ok:
            return "ok"
        stage = next(s for s in STAGES if row.cells.get(s) != "ok")
        return f"{stage}: see below"

    lines = [f"Made by `{command}` (transformers {_version('transformers')}, peft {_version('peft')}).", "",
             "| family | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    lines += [f"| {f} | " + " | ".join(summary(by.get((f, m))) for m in methods) + " |" for f in families]
    lines += ["", "| family | method | " + " | ".join(STAGES) + " | what trains |", "|---|---|" + "---|" * (len(STAGES) + 1)]
    for r in rows:
        cells = [r.cells.get(s, "-").replace("|", "\\|") for s in STAGES]
        lines.append(f"| {r.family} | {r.method} | " + " | ".join(cells) + f" | {r.targets.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def tokenizer_source() -> Path:
    from losia_cli.config import ModelConfig
    from losia_cli.models import resolve_model_path

    return Path(resolve_model_path(ModelConfig(name_or_path="package:smollm2-135m")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES), help="transformers model types")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, help="write the Markdown table here (default: print it)")
    parser.add_argument("--cache", type=Path, help="keep each family's rows here and reuse them (a long run in pieces)")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="losia-compat-") as tmp:
        source = None
        for family in args.families:
            kept = args.cache / f"{family}-{'-'.join(methods)}.json" if args.cache else None
            if kept and kept.is_file():
                rows += [Row(**row) for row in json.loads(kept.read_text())]
                continue
            source = source or tokenizer_source()
            family_rows = run_family(family, methods, Path(tmp), source)
            if kept:
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_text(json.dumps([dataclasses.asdict(row) for row in family_rows]))
            rows += family_rows
            for row in family_rows:
                print(f"{row.family:12} {row.method:10} " + " ".join(f"{s}={row.cells.get(s, '-')}" for s in STAGES),
                      file=sys.stderr)
    words = argv if argv is not None else sys.argv[1:]
    if args.cache:  # where the pieces were kept is no part of what made the table
        at = words.index("--cache")
        words = words[:at] + words[at + 2:]
    command = "python benchmarks/compat/matrix.py " + " ".join(words)
    table = markdown(rows, command.strip())
    if args.out:
        args.out.write_text(table)
    else:
        print(table)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
