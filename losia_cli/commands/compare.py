"""`losia compare`: train several methods on the same recipe, evaluate each, one table."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from losia_cli.commands.common import add_recipes_option, command_parser
from losia_cli.commands.console import console
from losia_cli.compose import parse_options

EXAMPLES = """\
examples:
  losia compare methods=[losia_pro,lora,full] train.max_steps=20 eval.tasks=[gsm8k@bundled:gsm8k_sample]
  losia compare recipe=llama2_7b_math methods=[losia_pro,lora] eval.tasks=[gsm8k]
"""


class CompareOptions(BaseModel):
    """The key=value options of `losia compare` itself; every other word overrides the recipe."""

    model_config = ConfigDict(extra="forbid")
    methods: list[str] = ["losia_pro", "lora", "full"]
    """The methods to train and compare (`[a,b]` or `a,b`)."""


def add_parser(subparsers) -> None:
    p = command_parser(subparsers, "compare", "train several methods on the same recipe, evaluate, one table",
                       EXAMPLES, run)
    p.add_argument("overrides", nargs="*", help="methods=[a,b,...] and recipe key=value overrides")
    add_recipes_option(p)


def run(args) -> int:
    from losia_cli.compare import compare

    own = [word for word in args.overrides if word.startswith("methods=")]
    overrides = [word for word in args.overrides if word not in own]
    compare(parse_options(own, CompareOptions).methods, overrides, console, args.recipes)
    return 0
