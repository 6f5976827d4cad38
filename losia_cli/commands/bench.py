"""`losia bench`: step latency / memory of methods side by side, in one process (losia_cli/bench/).
Options in the one key=value grammar; --out/--plot/--from name files, as in the other commands."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from losia_cli.commands.common import command_parser
from losia_cli.compose import parse_options
from losia_cli.errors import UsageError

EXAMPLES = """\
examples:
  losia bench model=llama_h512_l4 methods=[floor,lora,losia_pro] batch=4 seq=256
  losia bench model=llama2_7b methods=[floor,lora,losia_pro] batch=16 seq=256 dtype=bf16 device=cuda --no-interleave
  losia bench model=llama2_7b methods=[floor,lora,lora_bf16,losia_pro] batch=16 seq=256 device=meta
  losia bench --from benchmarks/results/cpu_llama_h512_l4.json     # re-print and re-plot a saved result
options: {options}
"""


@dataclass
class BenchOptions:
    """What to measure (the key=value options of `losia bench`). A plain dataclass: bench runs where only
    torch, transformers and peft are installed (a bare CUDA image)."""

    model: str = "llama_h512_l4"
    """A shape of losia_cli.bench.SHAPES (random weights) or a local Hugging Face model dir."""
    methods: list[str] = field(default_factory=lambda: ["floor", "full", "lora", "losia_pro"])
    """Methods to measure side by side (`[a,b]` or `a,b`)."""
    batch: int = 4
    seq: int = 256
    steps: int = 10
    """Measured steps per method."""
    warmup: int = 2
    """Unmeasured steps per method first."""
    device: Literal["auto", "cpu", "cuda", "meta"] = "auto"
    """auto: cuda when available, else cpu. meta: FLOPs and bytes of the real shapes, nothing timed."""
    dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """Default: bf16 on cuda and meta, fp32 on cpu."""
    activation_checkpointing: bool = False
    lora_rank: int = 8
    """LoRA/DoRA/PiSSA/GaLore rank; LoSiA gets the parity rank factor."""
    rank_factor: float | None = None
    """LoSiA p (default: parity with lora_rank)."""
    period: int | None = None
    """LoSiA time-slot length T (default: the method's)."""
    seed: int = 0
    interleave: bool = True
    """Round-robin the measured steps; false times one method after another, freeing each model."""
    rss: bool = True
    """CPU: measure each method's peak RSS in a child process."""
    threads: int | None = None
    """torch CPU threads."""
    note: str | None = None
    """Free text stored as meta.notes (e.g. machine load)."""

    def __post_init__(self):
        for key in ("batch", "seq", "steps", "lora_rank"):  # steps and warmup: run_bench's check
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be > 0 (got {getattr(self, key)})")


def add_parser(subparsers) -> None:
    options = " ".join(f.name for f in dataclasses.fields(BenchOptions))
    p = command_parser(subparsers, "bench", "step latency / memory of methods side by side, in one process",
                       EXAMPLES.format(options=options), run)
    p.add_argument("options", nargs="*", help="key=value options, e.g. model=llama2_7b methods=[lora,losia_pro]")
    p.add_argument("--out", help="JSON path (default benchmarks/results/<device>_<model>.json)")
    p.add_argument("--plot", metavar="PNG", help="also write a bar chart of the results")
    p.add_argument("--from", dest="from_json", metavar="JSON",
                   help="run nothing: re-print and plot an existing results JSON (--plot default: JSON.png)")
    # Flag spellings of four options, kept for the command lines in benchmarks/README.md.
    p.add_argument("--no-interleave", dest="interleave", action="store_false", default=None, help="interleave=false")
    p.add_argument("--no-rss", dest="rss", action="store_false", default=None, help="rss=false")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="activation_checkpointing=true")
    p.add_argument("--note", help="note=TEXT")


def run(args) -> int:
    import torch

    from losia_cli import atomic
    from losia_cli.bench import load_report, markdown_table, plot_report, run_bench, timing_table
    from losia_cli.models import best_device

    opts = parse_options(args.options, BenchOptions)
    flags = {k: getattr(args, k) for k in ("interleave", "rss", "activation_checkpointing", "note")}
    opts = dataclasses.replace(opts, **{k: v for k, v in flags.items() if v is not None})
    if args.from_json:
        report = load_report(args.from_json)
        if report["meta"]["device"] == "meta":
            raise UsageError(f"{args.from_json} is a meta count (no timings to plot); its table is the .md next to it")
        print(timing_table(report))
        print(f"wrote {plot_report(report, args.plot or Path(args.from_json).with_suffix('.png'))}")
        return 0
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = opts.device if opts.device != "auto" else best_device().type
    report = run_bench(
        model=opts.model, methods=opts.methods, batch=opts.batch, seq=opts.seq, steps=opts.steps,
        warmup=opts.warmup, device=device, dtype=opts.dtype, activation_checkpointing=opts.activation_checkpointing,
        lora_rank=opts.lora_rank, rank_factor=opts.rank_factor, seed=opts.seed, interleave=opts.interleave,
        rss=None if opts.rss else False, period=opts.period, notes=opts.note,
        progress=lambda msg: print(msg, flush=True),
    )
    shape = Path(opts.model).name if Path(opts.model).expanduser().is_dir() else opts.model
    out = Path(args.out or f"benchmarks/results/{torch.device(device).type}_{shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, report)
    if device == "meta":  # counts, no timings: a Markdown table, also written next to the JSON
        cfg = report["meta"]["config"]
        table = (f"{shape}, B{cfg['batch']}xT{cfg['seq']}, {cfg['dtype']}, one optimizer step, on meta "
                 f"(`{report['meta']['command']}`)\n\n" + markdown_table(list(report["results"].values())) + "\n")
        atomic.write_text(out.with_suffix(".md"), table)
        print(table)
        print(f"wrote {out} and {out.with_suffix('.md')}")
        return 0
    print(timing_table(report))
    print(f"wrote {out}")
    if args.plot:
        print(f"wrote {plot_report(report, args.plot)}")
    return 0
