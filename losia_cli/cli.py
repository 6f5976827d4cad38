"""`losia` command line: argument parsing, sub-commands and Hydra composition; no training logic."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from losia_cli.resources import recipes_dir

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

TRAIN_EXAMPLES = """\
examples:
  losia train                                        # embedded default: SmolLM2-135M, bundled math, CPU
  losia train recipe=smollm2_135m_math method=lora train.max_steps=20
  losia train recipe=gemma2b_math method.rank_factor=0.25 train.lr=5e-5
  losia train recipe=smollm2_135m_math run.name=demo run.resume=auto
  losia train -m method=losia_pro,lora,full train.max_steps=10   # a sweep, one run per method
  losia train recipe=llama2_7b_math dist=zero2 dist.num_processes=8   # relaunches through accelerate
  losia train recipe=smollm2_135m_continual method=lora            # continual: stages in sequence
"""

RECIPES_EXAMPLES = """\
examples:
  losia recipes ls
  losia recipes cat smollm2_135m_math
  losia recipes cp smollm2_135m_math ./my_recipes/       # then: losia train --recipes ./my_recipes ...
  losia recipes validate llama2_7b_math train.lr=2e-5
"""


class UsageError(ValueError):
    """A mistake on the command line itself."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from losia_cli.config import ConfigError
    from losia_cli.bench import BenchError
    from losia_cli.chat import ChatError
    from losia_cli.data import DataError
    from losia_cli.eval.sandbox import CodeExecutionNotAllowed
    from losia_cli.export import ExportError
    from losia_cli.merge import MergeError
    from losia_cli.models import ModelError
    from losia_cli.report import ReportError
    from losia_cli.slurm import SlurmError

    return (UsageError, ConfigError, DataError, ModelError, MergeError, BenchError, ReportError,
            SlurmError, CodeExecutionNotAllowed, ChatError, ExportError, HydraException, OmegaConfBaseException)


# --- composition ----------------------------------------------------------------------------------
def recipe_names(root: Path | None = None) -> list[str]:
    root = root or recipes_dir()
    return sorted(p.stem for p in (root / "recipe").glob("*.yaml"))


def _hydra_message(exc: Exception) -> str:
    text = str(exc)
    if m := re.search(r"Could not override '([^']+)'", text):
        return f"unknown key '{m.group(1)}' (see `losia recipes cat` for the keys a recipe has)"
    if m := re.search(r"Could not find '([^']+)'", text):
        group = m.group(1).split("/")[0]
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        return f"unknown {group} '{m.group(1).split('/', 1)[-1]}'; available: {', '.join(options)}"
    return text.strip().splitlines()[0]


def compose(overrides: list[str], root: Path | None = None):
    """Compose the recipe tree with overrides; returns (DictConfig, recipe name)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    root = root or recipes_dir()
    for item in overrides:
        if item.startswith("recipe=") and item.split("=", 1)[1] not in recipe_names(root):
            raise UsageError(
                f"unknown recipe '{item.split('=', 1)[1]}'; available: {', '.join(recipe_names(root))}"
            )
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(root.resolve()), version_base=None):
        try:
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
        except HydraException as e:
            raise UsageError(_hydra_message(e)) from None
    recipe = cfg.hydra.runtime.choices.get("recipe")
    return cfg, recipe


def load_config(overrides: list[str], root: Path | None = None, quiet: bool = False):
    """Compose and validate; `quiet` leaves the validation notes unprinted (they were shown once)."""
    from omegaconf import OmegaConf, open_dict

    from losia_cli.config import validate

    cfg, recipe = compose(overrides, root)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.recipe = recipe
    notes: list[str] = []
    validated = validate(OmegaConf.to_container(cfg, resolve=True), notes)
    for note in [] if quiet else notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}")
    return validated


# --- commands -------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    if args.multirun:
        return _multirun(args)
    return _train_or_launch(load_config(args.overrides, args.recipes), args.overrides, args.recipes)


def _train_or_launch(cfg, overrides: list[str], recipes: Path | None) -> int:
    """Train `cfg` here, relaunch it over several processes, or run its continual stages; the exit code."""
    from losia_cli.engine.loop import name_run, train
    from losia_cli.launch import needs_launch, relaunch

    if cfg.stages:  # continual learning: one run per stage, see losia_cli/continual.py
        from losia_cli.continual import run_continual
        run_continual(cfg, console)
        return 0
    if needs_launch(cfg):
        return relaunch(name_run(cfg), overrides, recipes)
    train(cfg, console=console)
    return 0


def _multirun(args) -> int:
    """Sweeps go through Hydra's own launcher machinery (basic, or submitit for Slurm)."""
    from datetime import datetime

    import hydra

    root = (args.recipes or recipes_dir()).resolve()
    sys.argv = ["losia", "-m", *args.overrides]
    # The stamp is taken once, here: a sweep job that submitit requeues (it pickles the task) gets
    # the same run name again and, with run.resume=auto, continues its own run dir.
    task = _SweepJob(datetime.now().strftime("%Y%m%d-%H%M%S"), args.recipes)
    hydra.main(config_path=str(root), config_name="config", version_base=None)(task)()
    return 0


class _SweepJob:
    """One job of a sweep. A module-level class, not a closure: submitit pickles it for each job,
    and a closure would drag this module's consoles (locks) along."""

    def __init__(self, stamp: str, recipes: Path | None):
        self.stamp, self.recipes = stamp, recipes

    def __call__(self, cfg) -> None:
        try:
            self.run(cfg)
        except _user_errors() as e:  # one line, as outside sweeps; Hydra would print a traceback
            err_console.print("[bold red]error:[/]", escape(str(e)))
            raise SystemExit(2) from None

    def run(self, cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from losia_cli.config import validate

        hc = HydraConfig.get()
        raw = OmegaConf.to_container(cfg, resolve=True)
        raw["recipe"] = hc.runtime.choices.get("recipe")
        run_cfg = validate(raw, [])
        if not run_cfg.run.name:
            name = f"{run_cfg.recipe or 'run'}-{run_cfg.method.name}-{self.stamp}-{hc.job.num}"
            run_cfg = run_cfg.model_copy(
                update={"run": run_cfg.run.model_copy(update={"name": name, "resume": run_cfg.run.resume or "auto"})}
            )
        # A relaunched worker composes from the overrides, so they carry what was filled in here.
        overrides = list(hc.overrides.task)
        if run_cfg.run.resume and not any(o.startswith("run.resume=") for o in overrides):
            overrides.append(f"run.resume={run_cfg.run.resume}")
        code = _train_or_launch(run_cfg, overrides, self.recipes)
        if code:
            raise SystemExit(code)


def cmd_recipes(args) -> int:
    root = args.recipes or recipes_dir()
    if args.action == "ls":
        for name in recipe_names(root):
            header = (root / "recipe" / f"{name}.yaml").read_text().splitlines()
            about = next((line.lstrip("# ").strip() for line in header if line.startswith("# ") and
                          not line.startswith("# @") and not line.startswith("# losia")), "")
            console.print(f"[bold]{name:<26}[/] {escape(about)}", soft_wrap=True)
        return 0
    if not args.name:
        raise UsageError(f"losia recipes {args.action} needs a recipe name")
    path = root / "recipe" / f"{args.name}.yaml"
    if not path.is_file():
        raise UsageError(f"unknown recipe '{args.name}'; available: {', '.join(recipe_names(root))}")
    if args.action == "cat":
        from omegaconf import OmegaConf

        console.print(f"[dim]# {path}[/]")
        console.print(path.read_text(), markup=False)
        cfg = load_config([f"recipe={args.name}", *args.rest], root)
        console.print("[dim]# composed, with defaults:[/]")
        console.print(OmegaConf.to_yaml(cfg.model_dump(mode="json")), markup=False)
        return 0
    if args.action == "cp":
        if not args.rest:
            raise UsageError("losia recipes cp NAME DEST: DEST is missing")
        return _copy_recipe(root, args.name, Path(args.rest[0]))
    if args.action == "validate":
        from losia_cli.validate import validate_recipe

        cfg = load_config([f"recipe={args.name}", *args.rest], root)
        validate_recipe(cfg, console)
        return 0
    raise UsageError(f"unknown action {args.action}")


def _copy_recipe(root: Path, name: str, dest: Path) -> int:
    """Copy the whole recipe tree (so groups resolve) into DEST, for `--recipes DEST` later."""
    if dest.exists() and any(dest.iterdir()):
        if (dest / "recipe" / f"{name}.yaml").exists():
            raise UsageError(f"{dest / 'recipe' / (name + '.yaml')} already exists")
    shutil.copytree(root, dest, dirs_exist_ok=True)
    console.print(f"copied recipe tree to {dest}; edit {dest / 'recipe' / (name + '.yaml')} and run "
                  f"`losia train --recipes {dest} recipe={name}`")
    return 0


def cmd_merge(args) -> int:
    from losia_cli.merge import merge

    manifest = merge(args.run_dir, args.out, dtype=args.dtype, shard_size=args.shard_size, force=args.force)
    verified = manifest["verified"]
    extra = ""
    if "max_abs_logit_diff_vs_adapter" in verified:
        extra = f", max |logit diff| vs adapter {verified['max_abs_logit_diff_vs_adapter']:.2e}"
    console.print(
        f"[green]merged[/] {manifest['method']} run -> {args.out} ({args.dtype}, "
        f"{verified['tensors_equal']} tensors verified bit-exact after reload{extra})"
    )
    return 0


def parse_eval_config(words: list[str]):
    from omegaconf import OmegaConf
    from pydantic import ValidationError

    from losia_cli.config import ConfigError, format_validation_error
    from losia_cli.eval.command import EvalConfig

    bad = [w for w in words if "=" not in w]
    if bad:
        raise UsageError(f"expected key=value, got {bad[0]!r}")
    raw = OmegaConf.to_container(OmegaConf.from_dotlist(words))
    if isinstance(raw.get("tasks"), str):
        raw["tasks"] = [t for t in raw["tasks"].split(",") if t]
    try:
        return EvalConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def cmd_eval(args) -> int:
    from losia_cli.eval.command import load_target, run_eval

    cfg = parse_eval_config(args.options)
    if args.baseline and cfg.backend == "lm_eval":
        raise UsageError("--baseline works with the native backend only (backend=native)")
    model, tokenizer, identity, out_dir = load_target(args.target)
    baseline = load_target(args.baseline)[:2] if args.baseline else None
    run_eval(model, tokenizer, cfg, args.out or out_dir, identity, console, baseline)
    return 0


def _sampling(args):
    from losia_cli.chat import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed, batch_size=getattr(args, "batch_size", 8))


def cmd_chat(args) -> int:
    from losia_cli.chat import chat, set_chat_template
    from losia_cli.eval.command import load_target

    sampling = _sampling(args)  # bad options fail before the model loads
    model, tokenizer, _, _ = load_target(args.target)
    set_chat_template(tokenizer, args.chat_template)
    chat(model, tokenizer, sampling, system=args.system)
    return 0


def cmd_generate(args) -> int:
    from losia_cli.chat import generate_file, read_prompts, set_chat_template
    from losia_cli.eval.command import load_target

    sampling = _sampling(args)
    read_prompts(args.prompts)  # bad options and rows fail before the model loads
    model, tokenizer, _, _ = load_target(args.target)
    set_chat_template(tokenizer, args.chat_template)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done, skipped = generate_file(model, tokenizer, args.prompts, args.out, sampling, system=args.system,
                                  console=err_console)
    console.print(f"[green]generated[/] {done} replies ({skipped} already answered) -> {args.out}")
    return 0


def cmd_export(args) -> int:
    from losia_cli.eval.command import load_target
    from losia_cli.export import export_gguf
    from losia_cli.model_card import write_model_card

    model, tokenizer, identity, _ = load_target(str(args.target))
    result = export_gguf(model, tokenizer, args.out, outtype=args.outtype, name=Path(args.target).name,
                         force=args.force)
    card = write_model_card(
        args.out.with_name(f"{args.out.stem}.README.md"), identity.get("run_dir"),
        base_model=identity.get("name_or_path"), library="gguf",
        notes=[f"**format**: GGUF {args.outtype} ({args.out.name}), logits verified through transformers' "
               f"GGUF loader (max drift vs the unrounded model {result['max_abs_logit_drift']:.2e})"],
    )
    console.print(f"[green]exported[/] {args.out} ({args.outtype}, {result['bytes'] / 2**20:.1f} MiB; reloaded "
                  f"logits equal the {args.outtype}-rounded model's; drift vs unrounded "
                  f"{result['max_abs_logit_drift']:.2e}, {result['relative_logit_drift']:.1%} of the logit range); "
                  f"card -> {card}")
    return 0


def cmd_report(args) -> int:
    from losia_cli.report import build_report

    page = build_report(args.run_dirs, args.out)
    console.print(f"[green]report[/] -> {page} (open it in a browser; PNGs beside it)")
    return 0


def cmd_compare(args) -> int:
    from losia_cli.compare import compare

    methods, overrides = ["losia_pro", "lora", "full"], []
    for word in args.overrides:
        if word.startswith("methods="):
            methods = [m.strip() for m in word.split("=", 1)[1].strip("[]").split(",") if m.strip()]
        else:
            overrides.append(word)
    compare(methods, overrides, console, args.recipes)
    return 0


def cmd_slurm(args) -> int:
    from losia_cli.slurm import SlurmOptions, slurm

    opts = SlurmOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time, partition=args.partition,
        account=args.account, job_name=args.job_name, out_dir=args.out_dir, cpus_per_task=args.cpus_per_task,
        mem=args.mem, exclusive=args.exclusive, signal_seconds=args.signal_seconds, submit=args.submit,
    )
    slurm(args.recipe, args.overrides, opts, console, args.recipes)
    return 0


# --- entry point ----------------------------------------------------------------------------------
MERGE_EXAMPLES = """\
examples:
  losia merge runs/demo --out merged/
  losia merge runs/lora-run --out merged-bf16/ --dtype bf16 --shard-size 2GB --force
"""

EVAL_EXAMPLES = """\
examples:
  losia eval runs/demo tasks=[gsm8k@bundled:gsm8k_sample] limit=32
  losia eval package:smollm2-135m tasks=[humaneval] allow_code_exec=true
  losia eval runs/demo tasks=[boolq@bundled:boolq_sample] --baseline package:smollm2-135m
  losia eval runs/demo backend=lm_eval tasks=[arc_easy,hellaswag] num_fewshot=0 limit=100
  losia eval runs/demo backend=lm_eval tasks=[my_task] include_path=./my_tasks   # local harness YAMLs
tasks: TASK (with a default eval set: {defaults}) or TASK@SOURCE (any data.source)
options: tasks limit batch_size max_new_tokens num_samples temperature top_p allow_code_exec
         chat timeout_s forgetting seed backend (native|lm_eval) include_path num_fewshot
"""

COMPARE_EXAMPLES = """\
examples:
  losia compare methods=[losia_pro,lora,full] train.max_steps=20 eval.tasks=[gsm8k@bundled:gsm8k_sample]
  losia compare recipe=llama2_7b_math methods=[losia_pro,lora] eval.tasks=[gsm8k]
"""

REPORT_EXAMPLES = """\
examples:
  losia report runs/demo                                 # -> runs/demo/report/report.html + PNGs
  losia report runs/demo-losia_pro runs/demo-lora --out report-compare   # overlay several runs
  losia report runs/continual-demo                       # accuracy matrix, BWT and forgetting
"""

SLURM_EXAMPLES = """\
examples:
  losia slurm smollm2_135m_math --nodes 1 --gpus-per-node 1 --time 01:00:00      # writes runs/<name>/slurm/job.sbatch
  losia slurm llama2_7b_math method=lora --nodes 2 --gpus-per-node 8 --time 12:00:00 --partition gpu --submit
  losia slurm gemma2b_math dist=zero2 run.name=g2b --nodes 4 --gpus-per-node 4 --time 2-00:00:00 --submit
  losia slurm smollm2_135m_math --nodes 1 --gpus-per-node 0 --cpus-per-task 8 --time 30:00   # a CPU job
A requeued job (time limit, preemption) resumes the same run dir from its latest checkpoint.
"""

BENCH_EXAMPLES = """\
examples:
  losia bench model=llama_h512_l4 methods=[floor,lora,losia_pro] batch=4 seq=256
  losia bench model=llama2_7b methods=[floor,lora,losia_pro] batch=16 seq=256 dtype=bf16 device=cuda --no-interleave
"""


CHAT_EXAMPLES = """\
examples:
  losia chat runs/demo                                   # /reset starts over, /exit quits
  echo "What is 7*8?" | losia chat package:smollm2-135m --max-new-tokens 32
  losia chat runs/demo --system "You are terse." --temperature 0.7 --top-p 0.9
"""

GENERATE_EXAMPLES = """\
examples:
  losia generate runs/demo prompts.jsonl --out replies.jsonl      # rows: {"prompt": "...", "id": ...}
  losia generate package:smollm2-135m prompts.jsonl --out r.jsonl --batch-size 16 --temperature 0.7
Run it again to resume: prompts already in --out (by id, else by prompt text) are skipped.
"""

EXPORT_EXAMPLES = """\
examples:
  losia export runs/demo --format gguf --out demo-f16.gguf
  losia export runs/demo --format gguf --outtype q8_0 --out demo-q8_0.gguf --force
Llama-family models with a byte-level BPE tokenizer (SmolLM2); writes FILE and STEM.README.md beside it.
"""


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="system prompt")
    p.add_argument("--chat-template", help="Jinja chat template (file or string) if the model has none")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    from losia_cli.bench import add_bench_arguments, bench_command
    from losia_cli.eval.command import DEFAULT_SOURCES

    parser = argparse.ArgumentParser(
        prog="losia",
        description="Fine-tune LLMs with LoSiA / LoSiA-Pro and the paper's baselines, from YAML recipes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRAIN_EXAMPLES,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, examples: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    recipes_option = dict(type=Path, help="use this recipe tree instead of the bundled one")

    p = command("train", "train a recipe (Hydra overrides: key=value)", TRAIN_EXAMPLES, cmd_train)
    p.add_argument("overrides", nargs="*", help="recipe=NAME and key=value overrides")
    p.add_argument("-m", "--multirun", action="store_true", help="sweep over comma-separated values")
    p.add_argument("--recipes", **recipes_option)

    p = command("recipes", "list, show, copy or validate recipes", RECIPES_EXAMPLES, cmd_recipes)
    p.add_argument("action", choices=["ls", "cat", "cp", "validate"])
    p.add_argument("name", nargs="?")
    p.add_argument("rest", nargs="*", help="cp: DEST; validate/cat: key=value overrides")
    p.add_argument("--recipes", **recipes_option)

    p = command("merge", "export a run as a plain Hugging Face model dir (verified)", MERGE_EXAMPLES, cmd_merge)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--shard-size", default="5GB")
    p.add_argument("--force", action="store_true", help="replace an existing --out dir")

    p = command("eval", "evaluate a run, model dir or hub id on math / code / commonsense tasks",
                EVAL_EXAMPLES.format(defaults=", ".join(DEFAULT_SOURCES)), cmd_eval)
    p.add_argument("target", help="run dir, model dir, .gguf, package:NAME or hub id")
    p.add_argument("options", nargs="*", help="key=value options (see below)")
    p.add_argument("--baseline", help="also evaluate this model; report per-task and forgetting deltas")
    p.add_argument("--out", type=Path, help="output dir (default: RUN/eval or runs/eval-*/eval)")

    p = command("chat", "talk to a run, model dir or hub id (streams; off a TTY: one turn per stdin line)",
                CHAT_EXAMPLES, cmd_chat)
    p.add_argument("target", help="run dir, model dir, .gguf, package:NAME or hub id")
    _sampling_arguments(p)

    p = command("generate", "answer a JSONL file of prompts, batched and resumable", GENERATE_EXAMPLES, cmd_generate)
    p.add_argument("target", help="run dir, model dir, .gguf, package:NAME or hub id")
    p.add_argument("prompts", type=Path, help='JSONL, one {"prompt": ..., "id"?: ...} per line')
    p.add_argument("--out", type=Path, required=True, help="JSONL replies (appended; resumable)")
    p.add_argument("--batch-size", type=int, default=8)
    _sampling_arguments(p)

    p = command("export", "write a run or model as one GGUF file (verified by reloading)", EXPORT_EXAMPLES,
                cmd_export)
    p.add_argument("target", help="run dir, model dir, package:NAME or hub id")
    p.add_argument("--format", choices=["gguf"], required=True)
    p.add_argument("--outtype", choices=["f16", "bf16", "q8_0"], default="f16")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="replace an existing --out file")

    p = command("compare", "train several methods on the same recipe, evaluate, one table",
                COMPARE_EXAMPLES, cmd_compare)
    p.add_argument("overrides", nargs="*", help="methods=[a,b,...] and recipe key=value overrides")
    p.add_argument("--recipes", **recipes_option)

    p = command("bench", "step latency / memory of methods side by side, in one process",
                BENCH_EXAMPLES, bench_command)
    add_bench_arguments(p)

    p = command("report", "figures and one self-contained HTML page for one run, or several overlaid",
                REPORT_EXAMPLES, cmd_report)
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help="output dir (default: RUN_DIR/report; ./report-compare for several)")

    p = command("slurm", "write (and --submit) an sbatch job that trains a recipe on N nodes, requeue-safe",
                SLURM_EXAMPLES, cmd_slurm)
    p.add_argument("recipe", help="recipe name (as in recipe=NAME)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for losia train")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0 for a CPU job")
    p.add_argument("--time", required=True, help="time limit, HH:MM:SS (or any Slurm --time format)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name", help="default: the run name")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node (one task per node)")
    p.add_argument("--mem", help="memory per node, e.g. 200G")
    p.add_argument("--exclusive", action="store_true", help="whole nodes only")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="warn the job this long before the time limit, to checkpoint (default 120)")
    p.add_argument("--out-dir", type=Path, help="where job.sbatch and the logs go (default: RUN_DIR/slurm)")
    p.add_argument("--submit", action="store_true", help="run sbatch and print the job id")
    p.add_argument("--recipes", **recipes_option)
    return parser


def _quiet_libraries(debug: bool) -> None:
    """losia prints its own progress; library progress bars and info logs only add noise."""
    if debug:
        return
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: before transformers
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    if not torch.cuda.is_available():  # else DeepSpeed warns at import that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    # bitsandbytes (pulled in by galore-torch, imported by peft) warns about optional CPU kernels.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from losia_cli.engine.preemption import PREEMPTED_EXIT_CODE, Preempted

    debug = args.debug or os.environ.get("HYDRA_FULL_ERROR") == "1"
    _quiet_libraries(debug)
    try:
        return args.func(args)
    except _user_errors() as e:
        if debug:
            raise
        err_console.print("[bold red]error:[/]", escape(str(e)))
        return 2
    except Preempted as e:
        err_console.print(f"[yellow]{escape(str(e))}[/]")
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    finally:
        # A worker must close its process group while the interpreter is alive: one that exits
        # with gloo's threads still holding work can die in SIGABRT ("terminate called without an
        # active exception") after the run itself succeeded.
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    # Through the importable module, not __main__: submitit pickles sweep jobs (_SweepJob) by name.
    from losia_cli.cli import main as cli_main

    sys.exit(cli_main())
