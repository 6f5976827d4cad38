"""`losia export`: a run or model as one GGUF file, verified by reading it back; a run's delta against
its base, or a LoRA adapter extracted from it (losia_cli/delta.py)."""

from __future__ import annotations

from pathlib import Path

from losia_cli.commands.common import command_parser
from losia_cli.commands.console import console
from losia_cli.errors import UsageError

EXAMPLES = """\
examples:
  losia export runs/demo --format gguf --out demo-f16.gguf
  losia export runs/demo --format gguf --outtype q8_0 --out demo-q8_0.gguf --force
  losia export runs/demo --format delta                 # -> runs/demo/delta (training dtype)
  losia export runs/demo --format delta --dtype bf16 --out demo-delta-bf16
  losia export runs/demo --format lora --rank 16        # -> runs/demo/lora-r16 (PEFT adapter)
llama (SmolLM2, Llama-2, Llama-3), mistral, qwen2, qwen3 and gemma models with a byte-level BPE or
sentencepiece tokenizer; writes FILE (its folder created) and STEM.README.md beside it.
--format gguf also takes a delta dir: the base its config names, with the delta applied.
"""


def add_parser(subparsers) -> None:
    p = command_parser(subparsers, "export", "write a run or model as one GGUF file, or a run as a delta or "
                       "LoRA adapter", EXAMPLES, run)
    p.add_argument("target", help="run dir, delta dir, model dir, package:NAME or hub id")
    p.add_argument("--format", choices=["gguf", "delta", "lora"], required=True)
    p.add_argument("--outtype", choices=["f16", "bf16", "q8_0"], default="f16")
    p.add_argument("--out", type=Path, help="the file (gguf) or dir to write; delta/lora: RUN/delta, RUN/lora-rR")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="delta values (default: the training dtype)")
    p.add_argument("--rank", type=int, help="lora: rank per matrix (default: exact, the delta's own rank)")
    p.add_argument("--energy", type=float, help="lora: per matrix, the least rank holding this share of "
                   "the squared singular values")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")


def run(args) -> int:
    if args.format != "gguf":
        return _run_delta(args)
    if args.out is None:
        raise UsageError("--format gguf needs --out FILE")
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


def _run_delta(args) -> int:
    from losia_cli.delta import export_delta, export_lora

    run_dir = Path(args.target)
    if args.format == "delta":
        config = export_delta(run_dir, args.out or run_dir / "delta", dtype=args.dtype, force=args.force)
        console.print(f"[green]delta[/] {args.out or run_dir / 'delta'}: {config['bytes'] / 2**20:.2f} MiB "
                      f"({config['dtype']}{', exact' if config['exact'] else ''}), {config['changed_params']:,} of "
                      f"{config['total_params']:,} parameters changed "
                      f"({config['changed_params'] / config['total_params']:.2%}) in {config['tensors']} tensors")
        return 0
    tag = f"r{args.rank}" if args.rank else f"e{args.energy}" if args.energy else "exact"
    out = args.out or run_dir / f"lora-{tag}"
    report = export_lora(run_dir, out, rank=args.rank, energy=args.energy, force=args.force)
    errors = sorted(m["relative_frobenius_error"] for m in report["matrices"].values())
    ranks = [m["rank"] for m in report["matrices"].values()]
    console.print(f"[green]lora[/] {out}: {len(ranks)} matrices, rank {min(ranks)}-{max(ranks)}, relative Frobenius "
                  f"error median {errors[len(errors) // 2]:.2e}, max {errors[-1]:.2e} (per matrix: "
                  f"{out / 'extraction.json'}); {report['left_out_changed_params']:,} changed parameters outside "
                  "linear layers left out")
    return 0
