"""`losia recipes`: list, show, copy or validate the recipes (YAML only: `ls` never imports torch)."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.markup import escape

from losia_cli.commands.common import add_recipes_option, command_parser
from losia_cli.commands.console import console
from losia_cli.compose import is_config_file, load_config, recipe_names
from losia_cli.errors import UsageError
from losia_cli.resources import recipes_dir

EXAMPLES = """\
examples:
  losia recipes ls
  losia recipes cat smollm2_135m_math
  losia recipes cp smollm2_135m_math my.yaml            # one resolved file, a comment per key
  losia recipes cp smollm2_135m_math ./my_recipes/       # the tree: losia train --recipes ./my_recipes ...
  losia recipes validate llama2_7b_math train.lr=2e-5
  losia recipes validate my.yaml train.lr=2e-5
"""


def add_parser(subparsers) -> None:
    p = command_parser(subparsers, "recipes", "list, show, copy or validate recipes", EXAMPLES, run)
    p.add_argument("action", choices=["ls", "cat", "cp", "validate"])
    p.add_argument("name", nargs="?")
    p.add_argument("rest", nargs="*", help="cp: DEST; validate/cat: key=value overrides")
    add_recipes_option(p)


def run(args) -> int:
    root = args.recipes or recipes_dir()
    if args.action == "ls":
        return _list(root)
    if not args.name:
        raise UsageError(f"losia recipes {args.action} needs a recipe name")
    # A one-file config stands for a recipe wherever one is read: `recipes validate my.yaml ...`.
    base = [args.name] if is_config_file(args.name) else [f"recipe={args.name}"]
    path = Path(args.name) if is_config_file(args.name) else root / "recipe" / f"{args.name}.yaml"
    if not path.is_file():
        raise UsageError(f"unknown recipe '{args.name}'; available: {', '.join(recipe_names(root))}")
    if args.action == "cat":
        from omegaconf import OmegaConf

        console.print(f"[dim]# {path}[/]")
        console.print(path.read_text(), markup=False)
        cfg = load_config([*base, *args.rest], root)
        console.print("[dim]# composed, with defaults:[/]")
        console.print(OmegaConf.to_yaml(cfg.model_dump(mode="json")), markup=False)
        return 0
    if args.action == "cp":
        if not args.rest:
            raise UsageError("losia recipes cp NAME DEST: DEST is missing")
        if is_config_file(args.rest[0]):
            return _write_config_file(load_config([*base, *args.rest[1:]], root), Path(args.rest[0]))
        return _copy_recipe(root, args.name, Path(args.rest[0]))
    from losia_cli.validate import validate_recipe

    validate_recipe(load_config([*base, *args.rest], root), console)
    return 0


def _list(root: Path) -> int:
    """One line per recipe: its name and the first plain comment line of its YAML."""
    for name in recipe_names(root):
        header = (root / "recipe" / f"{name}.yaml").read_text().splitlines()
        about = next((line.lstrip("# ").strip() for line in header if line.startswith("# ") and
                      not line.startswith("# @") and not line.startswith("# losia")), "")
        console.print(f"[bold]{name:<26}[/] {escape(about)}", soft_wrap=True)
    return 0


def _copy_recipe(root: Path, name: str, dest: Path) -> int:
    """Copy the whole recipe tree (so groups resolve) into DEST, for `--recipes DEST` later."""
    if dest.exists() and any(dest.iterdir()):
        if (dest / "recipe" / f"{name}.yaml").exists():
            raise UsageError(f"{dest / 'recipe' / (name + '.yaml')} already exists")
    shutil.copytree(root, dest, dirs_exist_ok=True)
    console.print(f"copied recipe tree to {dest}; edit {dest / 'recipe' / (name + '.yaml')} and run "
                  f"`losia train --recipes {dest} recipe={name}`")
    return 0


def _write_config_file(cfg, dest: Path) -> int:
    """One resolved file with a comment per key; `losia train DEST [key=value ...]` runs it."""
    from losia_cli import atomic
    from losia_cli.config import commented_yaml

    if dest.exists():
        raise UsageError(f"{dest} already exists")
    header = (f"# losia config, resolved from recipe {cfg.recipe}; run it with: losia train {dest}\n"
              "# `recipe:` names the base recipe; delete the keys you do not change, or the line to stand alone.\n")
    atomic.write_text(dest, header + commented_yaml(cfg.model_copy(update={"run": cfg.run.model_copy(
        update={"name": None})})) + "\n")
    console.print(f"wrote {dest}; run it with `losia train {dest}`")
    return 0
