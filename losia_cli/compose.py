"""Recipe composition and the one `key=value` grammar of every command.

`losia train`, `compare`, `slurm` and `recipes` compose the YAML tree with Hydra; `losia eval` and
`losia bench` read their options with the same override grammar (`key=value`, `a.b=1`, `k=[a,b]`,
`k=a,b`), validated by a pydantic model. Nothing here imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_origin

from losia_cli.errors import ConfigError, UsageError
from losia_cli.resources import recipes_dir


def recipe_names(root: Path | None = None) -> list[str]:
    root = root or recipes_dir()
    return sorted(p.stem for p in (root / "recipe").glob("*.yaml"))


def hydra_message(exc: Exception) -> str:
    """One line for a Hydra composition error, in the words of `losia` (keys, recipes, groups)."""
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
            raise UsageError(hydra_message(e)) from None
    recipe = cfg.hydra.runtime.choices.get("recipe")
    return cfg, recipe


def load_config(overrides: list[str], root: Path | None = None, quiet: bool = False):
    """Compose and validate; `quiet` leaves the validation notes unprinted (they were shown once)."""
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException
    from rich.console import Console
    from rich.markup import escape

    from losia_cli.config import validate

    cfg, recipe = compose(overrides, root)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.recipe = recipe
    notes: list[str] = []
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:  # a bad ${...} interpolation in a recipe
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    validated = validate(raw, notes)
    for note in [] if quiet else notes:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[yellow]note:[/] {escape(note)}")
    return validated


def parse_options(words: list[str], model):
    """`key=value` words in the override grammar -> a validated pydantic `model`. `k=a,b` and
    `k=[a,b]` give lists; one value for a list field is a list of one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from pydantic import ValidationError

    bad = [w for w in words if "=" not in w]
    if bad:
        raise UsageError(f"expected key=value, got {bad[0]!r}")
    try:
        overrides = OverridesParser.create().parse_overrides(words)
    except HydraException as e:
        raise UsageError(str(e).strip().splitlines()[0]) from None
    raw: dict = {}
    for override in overrides:
        value = list(override.sweep_iterator()) if override.is_sweep_override() else override.value()
        *parents, leaf = override.key_or_group.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        field = model.model_fields.get(leaf) if not parents else None
        if field is not None and get_origin(field.annotation) is list and not isinstance(value, list):
            value = [value]
        node[leaf] = value
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        from losia_cli.config import format_validation_error  # the run config's stack: only on an error

        raise ConfigError(format_validation_error(e)) from None
