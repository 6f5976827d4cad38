"""`losia merge`: export a run as a plain Hugging Face model dir, verified after reload."""

from __future__ import annotations

from pathlib import Path

from losia_cli.commands.common import command_parser
from losia_cli.commands.console import console

EXAMPLES = """\
examples:
  losia merge runs/demo --out merged/
  losia merge runs/lora-run --out merged-bf16/ --dtype bf16 --shard-size 2GB --force
  losia merge --delta runs/demo/delta --base package:smollm2-135m --out merged/
"""


def add_parser(subparsers) -> None:
    p = command_parser(subparsers, "merge", "export a run as a plain Hugging Face model dir (verified)", EXAMPLES, run)
    p.add_argument("run_dir", type=Path, nargs="?", help="a run dir (or --delta with --base)")
    p.add_argument("--delta", type=Path, help="a delta dir (losia export --format delta) to apply to --base")
    p.add_argument("--base", help="the model the delta applies to (model dir, package:NAME or hub id)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--shard-size", default="5GB")
    p.add_argument("--force", action="store_true", help="replace an existing --out dir")


def run(args) -> int:
    from losia_cli.errors import UsageError
    from losia_cli.merge import merge, merge_delta

    if (args.run_dir is None) == (args.delta is None) or (args.delta is None) != (args.base is None):
        raise UsageError("losia merge takes a run dir, or --delta PATH with --base BASE")
    options = dict(dtype=args.dtype, shard_size=args.shard_size, force=args.force)
    if args.delta:
        manifest = merge_delta(args.delta, args.base, args.out, **options)
    else:
        manifest = merge(args.run_dir, args.out, **options)
    verified = manifest["verified"]
    extra = ""
    if "max_abs_logit_diff_vs_adapter" in verified:
        extra = f", max |logit diff| vs adapter {verified['max_abs_logit_diff_vs_adapter']:.2e}"
    console.print(
        f"[green]merged[/] {manifest['method']} run -> {args.out} ({args.dtype}, "
        f"{verified['tensors_equal']} tensors verified bit-exact after reload{extra})"
    )
    return 0
