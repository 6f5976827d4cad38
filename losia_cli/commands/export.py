"""`losia export`: a run or model as one GGUF file, verified by reading it back."""

from __future__ import annotations

from pathlib import Path

from losia_cli.commands.common import command_parser
from losia_cli.commands.console import console
from losia_cli.errors import UsageError

EXAMPLES = """\
examples:
  losia export runs/demo --format gguf --out demo-f16.gguf
  losia export runs/demo --format gguf --outtype q8_0 --out demo-q8_0.gguf --force
llama (SmolLM2, Llama-2, Llama-3), mistral, qwen2, qwen3 and gemma models with a byte-level BPE or
sentencepiece tokenizer; writes FILE (its folder created) and STEM.README.md beside it.
"""


def add_parser(subparsers) -> None:
    p = command_parser(subparsers, "export", "write a run or model as one GGUF file (verified by reloading)",
                       EXAMPLES, run)
    p.add_argument("target", help="run dir, model dir, package:NAME or hub id")
    p.add_argument("--format", choices=["gguf"], required=True)
    p.add_argument("--outtype", choices=["f16", "bf16", "q8_0"], default="f16")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="replace an existing --out file")


def run(args) -> int:
    from losia_cli.eval.command import load_target
    from losia_cli.export import export_gguf
    from losia_cli.model_card import write_model_card

    out, target = args.out, Path(args.target)
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise UsageError(f"--out {out}: not a regular file; give the path of a file to write")
    if (target / "config.yaml").exists() and out.resolve().is_relative_to(target.resolve()):
        raise UsageError(f"--out {out}: inside the run dir it exports ({target}); write it elsewhere")
    model, tokenizer, identity, _ = load_target(str(args.target))
    result = export_gguf(model, tokenizer, args.out, outtype=args.outtype, name=Path(args.target).name,
                         force=args.force)
    verified = {"logits": "logits verified through transformers' GGUF loader",
                "tensors": "every tensor verified with gguf's reader (transformers cannot load this architecture)"}
    card = write_model_card(
        args.out.with_name(f"{args.out.stem}.README.md"), identity.get("run_dir"),
        base_model=identity.get("name_or_path"), library="gguf",
        notes=[f"**format**: GGUF {args.outtype} ({args.out.name}), {verified[result['verified_by']]} "
               f"(max logit drift vs the unrounded model {result['max_abs_logit_drift']:.2e})"],
    )
    console.print(f"[green]exported[/] {args.out} ({args.outtype}, {result['bytes'] / 2**20:.1f} MiB; the file holds "
                  f"the {args.outtype}-rounded model ({result['verified_by']} compared); drift vs unrounded "
                  f"{result['max_abs_logit_drift']:.2e}, {result['relative_logit_drift']:.1%} of the logit range); "
                  f"card -> {card}")
    return 0
