"""`losia bench`'s command line (parked here for losia_cli/commands/bench.py to take over)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from losia_cli import atomic
from losia_cli.bench import METHODS, SHAPES, load_report, plot_report, print_table, run_bench
from losia_cli.errors import BenchError
from losia_cli.models import DTYPES

def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `losia bench`; each also accepts the Hydra-like `key=value` form (see bench_command)."""
    parser.add_argument("--model", default="llama_h512_l4", help=f"shape ({', '.join(SHAPES)}) or a local HF dir")
    parser.add_argument("--methods", default="floor,full,lora,losia_pro",
                        help=f"comma list or [a,b]; known: {', '.join(METHODS)}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per method first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA/DoRA/PiSSA/GaLore rank; LoSiA parity rank")
    parser.add_argument("--rank-factor", type=float, default=None, help="LoSiA p (default: parity with --lora-rank)")
    parser.add_argument("--period", type=int, default=None, help="LoSiA time-slot length T (default: the method's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-interleave", action="store_true",
                        help="time methods one after another, freeing each model (for shapes that don't fit together)")
    parser.add_argument("--no-rss", action="store_true", help="CPU: skip the child-process peak-RSS pass")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--note", default=None, help="free text stored as meta.notes (e.g. machine load)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>_<model>.json)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also write a bar chart of the results")
    parser.add_argument("--from", dest="from_json", default=None, metavar="JSON",
                        help="run nothing: re-print and plot an existing results JSON (--plot default: JSON.png)")
    parser.add_argument("overrides", nargs="*", help="key=value forms, e.g. model=llama2_7b methods=[lora,losia_pro]")


def _apply_overrides(args: argparse.Namespace) -> argparse.Namespace:
    aliases = {"activation_checkpointing": "activation_checkpointing", "lora_rank": "lora_rank"}
    for item in args.overrides or []:
        if "=" not in item:
            raise BenchError(f"expected key=value, got '{item}'")
        key, value = item.split("=", 1)
        key = aliases.get(key, key.replace("-", "_"))
        if key not in vars(args) or key == "overrides":
            raise BenchError(f"unknown bench option '{key}'")
        current = getattr(args, key)
        if isinstance(current, bool) or key in ("no_interleave", "no_rss", "activation_checkpointing"):
            value = value.lower() in ("1", "true", "yes", "on")
        elif key in ("batch", "seq", "steps", "warmup", "lora_rank", "seed", "period", "threads"):
            value = int(value)
        elif key == "rank_factor":
            value = None if value.lower() in ("null", "none") else float(value)
        setattr(args, key, value)
    return args


def bench_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=140)  # logs: don't squeeze the table
    args = _apply_overrides(args)
    if args.from_json:
        report = load_report(args.from_json)
        print_table(report, console)
        out = plot_report(report, args.plot or Path(args.from_json).with_suffix(".png"))
        console.print(f"wrote {out}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.strip("[]").split(",") if m.strip()]
    report = run_bench(
        model=args.model, methods=methods, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
        device=args.device, dtype=args.dtype, activation_checkpointing=args.activation_checkpointing,
        lora_rank=args.lora_rank, rank_factor=args.rank_factor, seed=args.seed, interleave=not args.no_interleave,
        rss=False if args.no_rss else None, period=args.period, notes=args.note,
        progress=lambda msg: console.print(f"[dim]{msg}[/]"),
    )
    shape = Path(args.model).name if Path(args.model).expanduser().is_dir() else args.model
    out = Path(args.out or f"benchmarks/results/{torch.device(args.device).type}_{shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, report)
    print_table(report, console)
    console.print(f"wrote {out}")
    if args.plot:
        console.print(f"wrote {plot_report(report, args.plot)}")
    return 0


if __name__ == "__main__":  # python -m losia_cli.bench.command [args]: the same as `losia bench`
    parser = argparse.ArgumentParser(prog="losia bench", description=__doc__.split("\n")[0])
    add_bench_arguments(parser)
    try:
        raise SystemExit(bench_command(parser.parse_args()))
    except BenchError as e:
        parser.exit(2, f"losia bench: error: {e}\n")
