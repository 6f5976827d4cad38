"""The same LoRA fine-tune through the tools a user would pick instead of losia, one process at a time.

    python benchmarks/peers/peers.py [--tools trl,hf_trainer,losia_lora,losia_pro] [--steps 30]
                                     [--out benchmarks/results/peers_cpu.json]

Each tool runs in its own child process; the parent reads the child's peak RSS from wait4 (the
kernel's high-water mark of that process: the whole run, imports and model loading included, the
number `/usr/bin/time -v` prints) and its wall time, and the child reports its per-step times and
losses. Results of earlier tools in the --out file are kept, so tools can be run one command each.

The same work everywhere (README.md beside this file lists what still differs):
- data: losia's tokenization of the bundled GSM8K sample (data=gsm8k_sample, max length 256, loss on
  the answer only), written once as token ids + labels and fed to every tool, so the tokens and the
  loss mask are identical; micro-batch 4, right padding to the longest row of the batch;
- model: the packaged SmolLM2-135M-Instruct (package:smollm2-135m), fp32, on CPU;
- LoRA r=8, alpha=16, dropout 0 on q,k,v,o,gate,up,down_proj (peft); AdamW lr 5e-4, betas
  (0.9, 0.999), eps 1e-8, weight decay 0, gradient clipping at 1.0, 10% warmup then cosine to 0.1 lr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("trl", "trl_no_ac", "hf_trainer", "losia_lora", "losia_pro", "losia_lora_ac", "losia_pro_ac")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, MICRO, MAX_LEN, SEED = 5e-4, 4, 256, 0
LOSIA_COMMON = ["data=gsm8k_sample", f"data.max_length={MAX_LEN}", f"train.micro_batch_size={MICRO}",
                f"train.lr={LR}", "train.log_every=1", "train.save_every=1000000", f"seed={SEED}"]
LOSIA_METHOD = {"losia_lora": ["method=lora", "method.rank=8", "method.alpha=16"],
                "losia_pro": ["method=losia_pro"]}  # the recipe's LoSiA-Pro: rank_factor 0.125, period 2
# TRL's SFTConfig turns activation checkpointing on by default; `_ac` runs losia the same way and
# `trl_no_ac` runs TRL without it (as losia's and the Trainer's default).
AC = ["train.activation_checkpointing=true"]


# --- children --------------------------------------------------------------------------------------
def export_data(path: Path) -> None:
    """losia's tokenized GSM8K sample and the converted model dir, for the peers' children."""
    from losia_cli.compose import load_config
    from losia_cli.data import build_dataset
    from losia_cli.models import load_tokenizer, resolve_model_path
    from losia_cli.resources import cache_dir

    cfg = load_config(LOSIA_COMMON)
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model.revision, cfg.model.trust_remote_code)
    data = build_dataset(cfg.data, tokenizer, cache_dir=cache_dir() / "data")
    rows = [{"input_ids": list(map(int, data[i]["input_ids"])), "labels": list(map(int, data[i]["labels"]))}
            for i in range(len(data))]
    path.write_text(json.dumps({"model_path": model_path, "rows": rows}))


def peer_child(tool: str, steps: int, data_path: Path, out: Path) -> None:
    """TRL SFTTrainer or the plain transformers Trainer, with PEFT LoRA, on the exported tokens."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    exported = json.loads(data_path.read_text())
    model = AutoModelForCausalLM.from_pretrained(exported["model_path"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(exported["model_path"])
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    times: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    common = dict(output_dir=tempfile.mkdtemp(prefix="peers-"), max_steps=steps, per_device_train_batch_size=MICRO,
                  learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="cosine_with_min_lr",
                  lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=int(0.1 * steps), logging_steps=1,
                  save_strategy="no", report_to=[], seed=SEED, use_cpu=True, dataloader_num_workers=0)
    rows = exported["rows"]
    if tool.startswith("trl"):
        from trl import SFTConfig, SFTTrainer

        # Pre-tokenized: TRL skips its own tokenization; completion_mask = the answer tokens.
        dataset = Dataset.from_list([{"input_ids": r["input_ids"],
                                      "completion_mask": [int(x != -100) for x in r["labels"]]} for r in rows])
        # bf16=False: TRL defaults to bf16 autocast (fp32 everywhere here; on this CPU, without bf16
        # matmul units, its first step took 178 s instead of ~10 s).
        args = SFTConfig(**common, max_length=MAX_LEN, completion_only_loss=True, packing=False, bf16=False,
                         gradient_checkpointing=tool == "trl")
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora, callbacks=[Clock()])
    else:
        from peft import get_peft_model
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        dataset = Dataset.from_list(rows)
        trainer = Trainer(model=get_peft_model(model, lora), args=TrainingArguments(**common), train_dataset=dataset,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                          callbacks=[Clock()])
    trainer.train()
    out.write_text(json.dumps({"step_times_s": times, "losses": losses}))


# --- parent ----------------------------------------------------------------------------------------
def run_child(argv: list[str]) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS bytes) of one child process."""
    t0 = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(child.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss * 1024  # Linux: KiB


def run_tool(tool: str, steps: int, data_path: Path, work: Path) -> dict:
    if tool.startswith("losia"):
        run_dir = work / tool
        argv = [sys.executable, "-m", "losia_cli.cli", "train", *LOSIA_COMMON,
                *LOSIA_METHOD[tool.removesuffix("_ac")], *(AC if tool.endswith("_ac") else []),
                f"train.max_steps={steps}", f"run.output_dir={work}", f"run.name={tool}"]
        code, wall, rss = run_child(argv)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if code == 0 else []
        times = [m["step_time_s"] for m in metrics if "loss" in m]
        losses = [m["loss"] for m in metrics if "loss" in m]
    else:
        out = work / f"{tool}.json"
        code, wall, rss = run_child([sys.executable, __file__, "--child", tool, "--steps", str(steps),
                                     "--data", str(data_path), "--result", str(out)])
        child = json.loads(out.read_text()) if code == 0 else {"step_times_s": [], "losses": []}
        times, losses = child["step_times_s"], child["losses"]
    if code != 0:
        raise SystemExit(f"{tool} failed (exit {code})")
    return {"tool": tool, "steps": steps, "peak_rss_bytes": rss, "wall_s": wall,
            "median_step_s": statistics.median(times[1:] or times), "first_loss": losses[0], "final_loss": losses[-1],
            "losses": losses, "step_times_s": times}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS"),
            "platform": platform.platform(), "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/peers_cpu.json")
    parser.add_argument("--notes", default="")
    parser.add_argument("--child", choices=TOOLS)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    if args.child:
        return peer_child(args.child, args.steps, args.data, args.result)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {"results": {}}
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        work = Path(tmp)
        data_path = work / "data.json"
        export_data(data_path)
        for tool in args.tools.split(","):
            print(f"== {tool}", flush=True)
            report["results"][tool] = run_tool(tool, args.steps, data_path, work) | {
                "command": " ".join([Path(sys.argv[0]).name, *(a for a in sys.argv[1:] if a != args.notes)]).replace(" --notes", ""),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "notes": args.notes}
    report["machine"] = machine()
    report["versions"] = {d: metadata.version(d) for d in ("torch", "transformers", "peft", "trl", "accelerate")}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table)
    print(table)


def markdown(report: dict) -> str:
    """The results as a Markdown table, with the peak relative to TRL's."""
    results = report["results"]
    trl = results.get("trl", {}).get("peak_rss_bytes")
    lines = ["| run | steps | median step | wall (incl. imports + load) | peak RSS | vs TRL | loss first -> last | date |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in results.values():
        ratio = f"{r['peak_rss_bytes'] / trl:.2f}x" if trl else "-"
        lines.append(f"| {r['tool']} | {r['steps']} | {r['median_step_s']:.2f} s | {r['wall_s']:.0f} s | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {ratio} | {r['first_loss']:.4f} -> {r['final_loss']:.4f} | "
                     f"{r['date']} |")
    m, v = report["machine"], report["versions"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, OMP_NUM_THREADS={m['threads']}, {m['platform']}; "
              + ", ".join(f"{k} {x}" for k, x in v.items()) + ".", ""]
    lines += [f"- `{r['tool']}`: `{r['command']}`" for r in results.values()]
    notes = sorted({r["notes"] for r in results.values() if r.get("notes")})
    lines += ["", *notes, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
