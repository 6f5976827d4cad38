"""`losia compare`: train several methods on the same recipe, evaluate each, one table."""

from __future__ import annotations

from losia_cli.commands.common import add_recipes_option, command_parser, console

EXAMPLES = """\
examples:
  losia compare methods=[losia_pro,lora,full] train.max_steps=20 eval.tasks=[gsm8k@bundled:gsm8k_sample]
  losia compare recipe=llama2_7b_math methods=[losia_pro,lora] eval.tasks=[gsm8k]
"""


def add_parser(subparsers) -> None:
    p = command_parser(subparsers, "compare", "train several methods on the same recipe, evaluate, one table",
                       EXAMPLES, run)
    p.add_argument("overrides", nargs="*", help="methods=[a,b,...] and recipe key=value overrides")
    add_recipes_option(p)


def run(args) -> int:
    from losia_cli.compare import compare

    methods, overrides = ["losia_pro", "lora", "full"], []
    for word in args.overrides:
        if word.startswith("methods="):
            methods = [m.strip() for m in word.split("=", 1)[1].strip("[]").split(",") if m.strip()]
        else:
            overrides.append(word)
    compare(methods, overrides, console, args.recipes)
    return 0
