"""`losia train`: compose a recipe and train it here, over several processes, or as a sweep."""

from __future__ import annotations

import sys
from pathlib import Path

from losia_cli.commands.common import add_recipes_option, command_parser, error_line, print_error
from losia_cli.commands.console import console
from losia_cli.compose import is_config_file, load_config, sweep_words
from losia_cli.errors import UsageError
from losia_cli.resources import recipes_dir

EXAMPLES = """\
examples:
  losia train                                        # embedded default: SmolLM2-135M, bundled math, CPU
  losia train recipe=smollm2_135m_math method=lora train.max_steps=20
  losia train recipe=gemma2b_math method.rank_factor=0.25 train.lr=5e-5
  losia train recipe=smollm2_135m_math run.name=demo run.resume=auto
  losia train my.yaml train.lr=3e-4                  # a one-file config (losia recipes cp NAME my.yaml)
  losia train -m method=losia_pro,lora,full train.max_steps=10   # a sweep, one run per method
  losia train recipe=llama2_7b_math dist=zero2 dist.num_processes=8   # relaunches through accelerate
  losia train recipe=smollm2_135m_continual method=lora            # continual: stages in sequence
"""


def add_parser(subparsers) -> None:
    p = command_parser(subparsers, "train", "train a recipe (Hydra overrides: key=value)", EXAMPLES, run)
    p.add_argument("overrides", nargs="*", help="recipe=NAME and key=value overrides")
    p.add_argument("-m", "--multirun", action="store_true", help="sweep over comma-separated values")
    add_recipes_option(p)


def run(args) -> int:
    if args.multirun:
        return _multirun(args)
    return train_or_launch(load_config(args.overrides, args.recipes), args.overrides, args.recipes)


def train_or_launch(cfg, overrides: list[str], recipes: Path | None) -> int:
    """Train `cfg` here, relaunch it over several processes, or run its continual stages; the exit code."""
    from losia_cli.workflow import train
    from losia_cli.engine.rundir import name_run
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
    import hydra

    from losia_cli.provenance import timestamp

    if args.overrides and is_config_file(args.overrides[0]):
        raise UsageError("sweeps (-m) compose recipes: use recipe=NAME (or --recipes DIR), not a config file")
    root = (args.recipes or recipes_dir()).resolve()
    sys.argv = ["losia", "-m", *sweep_words(args.overrides, args.recipes)]
    # The stamp is taken once, here: a sweep job that submitit requeues (it pickles the task) gets
    # the same run name again and, with run.resume=auto, continues its own run dir.
    task = SweepJob(timestamp(), args.recipes, args.debug)
    hydra.main(config_path=str(root), config_name="config", version_base=None)(task)()
    return 0


class SweepJob:
    """One job of a sweep. A module-level class, not a closure: submitit pickles it for each job,
    and a closure would drag this module's consoles (locks) along."""

    def __init__(self, stamp: str, recipes: Path | None, debug: bool):
        self.stamp, self.recipes, self.debug = stamp, recipes, debug

    def __call__(self, cfg) -> None:
        try:
            self.run(cfg)
        except Exception as e:  # one line, as outside sweeps (cli.main); Hydra would print a traceback
            if not (line := error_line(e, self.debug)):
                raise
            print_error(line)
            raise SystemExit(2) from None

    def run(self, cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from losia_cli.config import resolved, validate
        from losia_cli.engine.rundir import default_run_name

        hc = HydraConfig.get()
        raw = resolved(cfg)
        raw["recipe"] = hc.runtime.choices.get("recipe")
        run_cfg = validate(raw, [])
        if not run_cfg.run.name:
            name = default_run_name(run_cfg, f"{self.stamp}-{hc.job.num}")
            run_cfg = run_cfg.model_copy(
                update={"run": run_cfg.run.model_copy(update={"name": name, "resume": run_cfg.run.resume or "auto"})}
            )
        # A relaunched worker composes from the overrides, so they carry what was filled in here.
        overrides = list(hc.overrides.task)
        if run_cfg.run.resume and not any(o.startswith("run.resume=") for o in overrides):
            overrides.append(f"run.resume={run_cfg.run.resume}")
        code = train_or_launch(run_cfg, overrides, self.recipes)
        if code:
            raise SystemExit(code)
