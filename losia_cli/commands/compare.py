"""`losia compare`: train several methods on the same recipe, evaluate each, one table."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat

from losia_cli.commands.common import add_recipes_option, command_parser
from losia_cli.commands.console import console
from losia_cli.compose import parse_options

EXAMPLES = """\
examples:
  losia compare methods=[losia_pro,lora,full] train.max_steps=20 eval.tasks=[gsm8k@bundled:gsm8k_sample]
  losia compare recipe=llama2_7b_math methods=[losia_pro,lora] eval.tasks=[gsm8k]
  losia compare methods=[losia_pro,lora] seeds=[1,2,3] lr_grid=[2e-4,5e-4,1e-3] \
      val_tasks=[gsm8k@val.jsonl] eval.tasks=[gsm8k@test.jsonl] data.source=train.jsonl
"""


class CompareOptions(BaseModel):
    """The key=value options of `losia compare` itself; every other word overrides the recipe."""

    model_config = ConfigDict(extra="forbid")
    methods: list[str] = ["losia_pro", "lora", "full"]
    """The methods to train and compare (`[a,b]` or `a,b`)."""
    seeds: list[NonNegativeInt] | None = Field(None, min_length=1)
    """Train every method once per seed (default: the recipe's `seed`); the report gives per-seed
    values, their mean and a 95% bootstrap interval over test items and seeds."""
    lr_grid: list[PositiveFloat] | None = Field(None, min_length=1)
    """Learning rates tried per method at the first seed; the best on `val_tasks` is used for all seeds."""
    val_tasks: list[str] = []
    """TASK@SOURCE validation sets that choose the learning rate (never the test tasks, `eval.tasks`)."""


def add_parser(subparsers) -> None:
    p = command_parser(subparsers, "compare", "train several methods on the same recipe, evaluate, one table",
                       EXAMPLES, run)
    p.add_argument("overrides", nargs="*", help="methods=[a,b,...] and recipe key=value overrides")
    add_recipes_option(p)


def run(args) -> int:
    from losia_cli.compare import compare

    own = [word for word in args.overrides if word.partition("=")[0] in CompareOptions.model_fields]
    overrides = [word for word in args.overrides if word not in own]
    options = parse_options(own, CompareOptions)
    compare(options.methods, overrides, console, args.recipes, seeds=options.seeds, lr_grid=options.lr_grid,
            val_tasks=options.val_tasks)
    return 0
