"""The quality benchmark: every method at parameter parity on SmolLM2-135M, its learning rate chosen
on the validation split, several seeds, test scores with 95% intervals, forgetting, cost.

    python benchmarks/quality/run.py --quick   # math, losia_pro + lora, 2 seeds: ~20 min on 2 free cores
    python benchmarks/quality/run.py           # math, choice, code; 7 methods; 3 seeds (see README)

Each (task, method) is one `losia compare` process (its own peak memory); the rows are merged into
benchmarks/results/quality_<mode>.{md,json,png} with the command, versions and machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE.parent / "results"
REPO = HERE.parents[1]

# task -> (template, the other task whose test score change is the second forgetting measure)
TASKS = {"math": ("gsm8k", "choice"), "choice": ("piqa", "math"), "code": ("mbpp", "choice")}
TEMPLATE = {name: template for name, (template, _) in TASKS.items()}
# Per-method learning-rate grids around each method's usual rate (subnet/adapter ~5e-4, full ~2e-5).
GRIDS = {"losia_pro": [5e-4, 1e-3, 2e-3], "losia": [5e-4, 1e-3, 2e-3], "lora": [5e-4, 1e-3, 2e-3],
         "dora": [5e-4, 1e-3, 2e-3], "pissa": [2e-4, 5e-4, 1e-3], "galore": [2e-4, 5e-4, 1e-3],
         "full": [1e-5, 2e-5, 5e-5]}
# LoSiA at LoRA-8's trainable-parameter count; the adapters at rank 8; GaLore at rank 8 (docs/method.md 3.2).
PARITY = {"losia_pro": ["method.lora_rank=8"], "losia": ["method.lora_rank=8"], "lora": ["method.rank=8"],
          "dora": ["method.rank=8"], "pissa": ["method.rank=8"], "galore": [], "full": []}
MODES = {
    # quick: the first 100 validation and test items of each task (eval.limit), answers cut at 64 tokens
    # (the worked solutions are ~45), so the whole mode fits ~20 minutes of 2 free cores.
    "quick": dict(tasks=["math"], methods=["losia_pro", "lora"], seeds=[1, 2], steps=40,
                  grids={"losia_pro": [5e-4, 1e-3], "lora": [5e-4, 1e-3]},
                  extra=["eval.limit=100", "eval.max_new_tokens=64"]),
    "full": dict(tasks=["math", "choice", "code"], methods=list(GRIDS), seeds=[1, 2, 3], steps=300, grids=GRIDS,
                 extra=["eval.max_new_tokens=96"]),
}


def spec(task: str, split: str) -> str:
    return f"{TEMPLATE[task]}@{DATA / f'{task}_{split}.jsonl'}"


def compare_command(task: str, method: str, mode: dict, out: Path) -> list[str]:
    held_out = TASKS[task][1]
    tests = [spec(task, "test"), spec(held_out, "test")]
    return [
        sys.executable, "-m", "losia_cli.cli", "compare", f"methods=[{method}]",
        f"seeds=[{','.join(map(str, mode['seeds']))}]", f"lr_grid=[{','.join(f'{lr:g}' for lr in mode['grids'][method])}]",
        f"val_tasks=['{spec(task, 'val')}']", f"eval.tasks=[{','.join(repr(t) for t in tests)}]",
        "recipe=smollm2_135m_math", f"data.task={TEMPLATE[task]}", f"data.source={DATA / f'{task}_train.jsonl'}",
        "data.max_length=256", "train.micro_batch_size=8", f"train.max_steps={mode['steps']}",
        f"eval.general_text={DATA / 'general_text.txt'}", "eval.batch_size=16", "eval.allow_code_exec=true",
        f"run.output_dir={out}", *PARITY[method], *mode["extra"],
    ]


def environment() -> dict:
    import torch
    import transformers
    import peft

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def markdown(result: dict) -> str:
    lines = [f"# Quality benchmark ({result['mode']}): SmolLM2-135M-Instruct, offline tasks", "",
             "```", result["command"], "```", "",
             f"- {result['started']} - {result['finished']} UTC; environment: "
             + ", ".join(f"{k} {v}" for k, v in result["environment"].items()),
             f"- Steps {result['steps']}, micro-batch 8, {' '.join(result['extra'])}, seeds {result['seeds']}; "
             "LR per method chosen on the "
             "validation split at the first seed; 95% interval: percentile bootstrap over test items and seeds.",
             "- Forgetting: general-text loss change (nats, "
             f"{result['general_text_tokens']} tokens) and the held-out task's score change.", ""]
    for task, rows in result["tasks"].items():
        held = TASKS[task][1]
        lines += [f"## {task} ({TEMPLATE[task]}; held-out task for forgetting: {held})", "",
                  "| method | LR (val score per LR) | trainable | test mean [95% CI] | per seed | "
                  f"{held} change | general-text Δ nats (per seed) | train wall s | peak mem GiB |",
                  "|---|---|---:|---:|---|---:|---:|---:|---:|"]
        base = rows[0]["base"]
        lines.append(f"| untrained | - | - | {base[TEMPLATE[task]]:.3f} | - | - | - | - | - |")
        for row in rows:
            main, other = row["intervals"][TEMPLATE[task]], row["intervals"][TEMPLATE[held]]
            grid = ", ".join(f"{lr}: {v:.3f}" for lr, v in row["lr_grid_val"].items())
            lines.append(
                f"| {row['method']} | {row['lr']:g} ({grid}) | {row['trainable_params']:,} | "
                f"{main['mean']:.3f} [{main['low']:.3f}, {main['high']:.3f}] | "
                f"{', '.join(f'{v:.3f}' for v in main['per_seed'])} | {other['change_vs_base']:+.3f} | "
                f"{row['forgetting_delta']:+.4f} ({', '.join(f'{v:+.4f}' for v in row['forgetting_per_seed'])}) | "
                f"{sum(row['train_wall_s']) / len(row['train_wall_s']):.0f} | {row['peak_mem_bytes'] / 2**30:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = result["tasks"][task]
        for i, row in enumerate(rows):
            iv = row["intervals"][TEMPLATE[task]]
            ax.errorbar(row["forgetting_delta"], iv["mean"], yerr=[[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]],
                        fmt="o", capsize=4, label=row["method"])
            ax.scatter([row["forgetting_delta"]] * len(iv["per_seed"]), iv["per_seed"], s=10, alpha=0.5, color=f"C{i}")
        ax.set_title(f"{task}: test score vs forgetting")
        ax.set_xlabel("general-text loss change (nats, lower = forgets less)")
        ax.set_ylabel(f"{TEMPLATE[task]} test score (95% CI)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one task, two methods, two seeds")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "quality", help="where the runs go")
    parser.add_argument("--reuse", action="store_true",
                        help="take a (task, method) from its compare.json already under --work (runs launched apart)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import make_data

    problems = make_data.check()
    if problems:
        print(f"benchmarks/quality/data: {problems[0]}", file=sys.stderr)
        return 2
    name = "quick" if args.quick else "full"
    mode = MODES[name]
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    result = {"mode": name, "command": "python benchmarks/quality/run.py" + (" --quick" if args.quick else ""),
              "started": started, "steps": mode["steps"], "extra": mode["extra"], "seeds": mode["seeds"], "tasks": {}, "commands": []}
    for task in mode["tasks"]:
        rows = []
        for method in mode["methods"]:
            out = args.work / f"{name}-{task}-{method}"
            command = compare_command(task, method, mode, out)
            result["commands"].append(" ".join(command[1:]))
            if not (args.reuse and list(out.glob("compare-*/compare.json"))):
                subprocess.run(command, check=True, cwd=REPO)
            compared = json.loads(max(out.glob("compare-*/compare.json")).read_text())
            row = compared["methods"][0]
            row["base"] = {t: next(iter(m.values())) for t, m in compared["base_tasks"].items()}
            result["general_text_tokens"] = compared["base_general_text_tokens"]
            rows.append(row)
        result["tasks"][task] = rows
    result["finished"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    result["environment"] = environment()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"quality_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"quality_{name}.md").write_text(markdown(result))
    plot(result, RESULTS / f"quality_{name}.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
