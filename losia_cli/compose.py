"""Recipe composition and the one `key=value` grammar of every command.

`losia train`, `compare`, `slurm` and `recipes` compose the YAML tree with Hydra; the options of
`losia eval`, `compare` and `bench` are read by `parse_options` (`key=value`, `a.b=1`, `k=[a,b]`,
`k=a,b`: the same spellings, without Hydra, so that bench runs where only torch, transformers and peft
are installed). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import get_origin

from losia_cli.errors import ConfigError, UsageError, omegaconf_message
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


def is_config_file(word: str) -> bool:
    """A one-file config: the first word of a command, a .yaml/.yml path instead of recipe=NAME."""
    return "=" not in word and word.endswith((".yaml", ".yml"))


def schema_has(key: str) -> bool:
    """Whether a dotted key (`data.packing`, `stages.0.train.lr`, `data.column_map.q`) names a
    field of the run schema, of any method's config, or a dict field's entry."""
    import dataclasses
    from types import UnionType
    from typing import Union, get_args, get_type_hints

    from pydantic import BaseModel

    from losia_cli.config import RunConfig
    from losia_cli.methods import config_classes

    def fields_in(annotation) -> list[dict]:
        """{field: annotation} of each section class in `annotation` (pydantic models, method dataclasses)."""
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [{name: f.annotation for name, f in annotation.model_fields.items()}]
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            return [get_type_hints(annotation)]
        return [fields for arg in get_args(annotation) for fields in fields_in(arg)]

    def walk(annotation, parts: list[str]) -> bool:
        if not parts:
            return True
        origin = get_origin(annotation)
        if origin in (Union, UnionType):
            return any(walk(arg, parts) for arg in get_args(annotation))
        if origin is dict:
            return len(parts) == 1
        if origin is list:
            return parts[0].isdigit() and walk(get_args(annotation)[0], parts[1:])
        return any(walk(fields[parts[0]], parts[1:]) for fields in fields_in(annotation) if parts[0] in fields)

    head, *rest = key.split(".")
    if head == "method":
        return any(walk(cls, rest) for cls in config_classes())
    return head in RunConfig.model_fields and walk(RunConfig.model_fields[head].annotation, rest)


def _groups(root: Path) -> set[str]:
    """The config groups of a recipe tree: model, data, method, train, dist, recipe."""
    return {p.name for p in root.iterdir() if p.is_dir()}


def _split(words: list[str], root: Path) -> tuple[list[str], list[str]]:
    """Words Hydra composes (group choices, hydra.*, +/~ edits) and plain `key=value` settings,
    which compose() applies itself so that every schema key is settable, present in a YAML or not.
    Every word is parsed here, so that an error names it."""
    groups = _groups(root)
    hydra_words, settings = [], []
    for word, override in zip(words, _parse(words)):
        key = override.key_or_group
        to_hydra = word.startswith(("+", "~")) or key in groups or key.startswith("hydra") or "=" not in word
        if to_hydra:
            _check_hydra_word(word, override, root)
        (hydra_words if to_hydra else settings).append(word)
    return hydra_words, settings


def _parse(words: list[str]) -> list:
    """Hydra's parse of each word; one that does not parse is named in the error."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, parsed = OverridesParser.create(), []
    for word in words:
        try:
            parsed += parser.parse_overrides([word])
        except HydraException as e:
            raise UsageError(f"override {word!r}: cannot parse ({hydra_message(e)})") from None
    return parsed


# Set in recipes/config.yaml: losia makes its own run dirs (run.output_dir/run.name) and Hydra none.
_MANAGED = ("hydra.run", "hydra.sweep", "hydra.output_subdir", "hydra.job.chdir")


def _check_hydra_word(word: str, override, root: Path) -> None:
    """Refuse what Hydra would take but losia cannot honour."""
    key = override.key_or_group
    if override.is_delete():  # the schema would silently fill in the deleted key's default
        raise UsageError(f"override {word!r}: keys cannot be deleted; set {key}=VALUE instead")
    if key.startswith(_MANAGED):
        raise UsageError(f"override {word!r}: losia manages its run dirs; set run.output_dir or run.name instead")
    if key in _groups(root) and not override.is_sweep_override() and not isinstance(override.value(), str):
        options = sorted(p.stem for p in (root / key).glob("*.yaml"))
        raise UsageError(f"override {word!r}: {key} takes one option name; available: {', '.join(options)}")


def _apply_settings(cfg, settings: list[str]) -> None:
    """`key=value` onto the composed config; a key neither composed nor in the schema is refused."""
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    missing = object()
    for override in _parse(settings):
        key = override.key_or_group
        if override.is_sweep_override():
            raise UsageError(f"'{override.input_line}' is a sweep; run it with `losia train -m`")
        if OmegaConf.select(cfg, key, default=missing) is missing and not schema_has(key):
            raise UsageError(f"unknown key '{key}' (see `losia recipes cat` for the keys a recipe has)")
        try:
            with open_dict(cfg):
                OmegaConf.update(cfg, key, override.value(), merge=True)
        except OmegaConfBaseException as e:  # e.g. a malformed ${...}
            raise UsageError(f"override {override.input_line!r}: {omegaconf_message(e)}") from None


def sweep_words(words: list[str], root: Path | None = None) -> list[str]:
    """Hydra's own sweep launcher composes by itself: schema keys go as `++key=...` (set or add)."""
    hydra_words, settings = _split(words, root or recipes_dir())
    return [*hydra_words, *(f"++{w}" if schema_has(w.split("=", 1)[0]) else w for w in settings)]


def _read_config_file(path: Path) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not path.is_file():
        raise UsageError(f"{path}: no such config file")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except (OmegaConfBaseException, ValueError) as e:  # yaml.YAMLError is a ValueError here
        raise ConfigError(f"{path}: {str(e).strip().splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, train:, ...)")
    return data


def compose(overrides: list[str], root: Path | None = None):
    """Compose the recipe tree (or a one-file config) with overrides; returns (DictConfig, recipe name).

    Order: recipe and groups (Hydra), then the config file's sections, then `key=value` settings. A
    file that names `recipe:` starts from that recipe; one without stands alone (schema defaults)."""
    from omegaconf import OmegaConf

    root = root or recipes_dir()
    file = Path(overrides[0]) if overrides and is_config_file(overrides[0]) else None
    hydra_words, settings = _split(overrides[1:] if file else overrides, root)
    sections = _read_config_file(file) if file else {}
    chosen = {w.split("=", 1)[0] for w in hydra_words}
    base = sections.pop("recipe", None)
    if base is not None and "recipe" not in chosen:  # recipe=NAME on the command line wins
        hydra_words.insert(0, f"recipe={base}")
    for key in [k for k in sections if k in _groups(root) and isinstance(sections[k], str)]:
        hydra_words.insert(0, f"{key}={sections.pop(key)}")  # `method: lora` picks a group option
    for key in chosen & set(sections):
        del sections[key]  # a group picked on the command line replaces the file's section
    unknown = [k for k in sections if not schema_has(k)]
    if unknown:
        raise ConfigError(f"{file}: unknown key '{unknown[0]}'")
    if file and base is None and "recipe" not in chosen:
        if hydra_words:
            raise UsageError(f"{file} names no `recipe:`, so groups cannot be picked "
                             f"(got {hydra_words[0]!r}); set whole sections instead")
        cfg, recipe = OmegaConf.create(sections), None
    else:
        cfg, recipe = _compose_tree(hydra_words, root)
        OmegaConf.set_struct(cfg, False)
        cfg.merge_with(sections)
        OmegaConf.set_struct(cfg, True)
    _apply_settings(cfg, settings)
    return cfg, recipe


def _compose_tree(overrides: list[str], root: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

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
    return cfg, cfg.hydra.runtime.choices.get("recipe")


def load_config(overrides: list[str], root: Path | None = None, quiet: bool = False):
    """Compose and validate; `quiet` leaves the validation notes unprinted (they were shown once)."""
    from omegaconf import open_dict
    from rich.console import Console
    from rich.markup import escape

    from losia_cli.config import validate

    cfg, recipe = compose(overrides, root)
    with open_dict(cfg):
        cfg.pop("hydra", None)
        cfg.recipe = cfg.get("recipe") or recipe
    notes: list[str] = []
    validated = validate(cfg, notes)
    for note in [] if quiet else notes:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[yellow]note:[/] {escape(note)}")
    return validated


def parse_options(words: list[str], model):
    """`key=value` words -> a validated `model`: a pydantic model (eval, compare) or a plain dataclass
    (bench, which must run where pydantic and Hydra are not installed).

    The grammar of option words (hydra-free, a subset of the recipe override grammar): a value is a YAML
    scalar or flow list (`k=4`, `k=1e-5`, `k=null`, `k=[a,b]`, `k='a b'`); `k=a,b` and a single value
    also give a list where the field is one; `a.b=1` sets a nested key."""
    import yaml

    raw: dict = {}
    for word in words:
        key, sep, text = word.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
            raise UsageError(f"expected key=value, got {word!r}")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:
            raise UsageError(f"{key}: cannot read the value {text!r} ({e.problem})") from None
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if hasattr(model, "model_validate"):
        from pydantic import ValidationError

        for name, field in model.model_fields.items():
            if get_origin(field.annotation) is list and name in raw:
                raw[name] = _as_list(raw[name])
        try:
            return model.model_validate(raw)
        except ValidationError as e:
            from losia_cli.config import format_validation_error  # the run config's stack: only on an error

            raise ConfigError(format_validation_error(e)) from None
    return _dataclass_from(model, raw)


def _as_list(value) -> list:
    if isinstance(value, list):
        return value
    return value.split(",") if isinstance(value, str) else [value]


def _dataclass_from(cls, raw: dict):
    """`cls(**raw)` with each value checked against (and converted to) its field's type; the class's
    `__post_init__` checks ranges. Types: bool, int, float, str, Literal, list[...] and `X | None`."""
    import dataclasses
    from types import NoneType, UnionType
    from typing import Literal, Union, get_args, get_type_hints

    types = get_type_hints(cls)
    hints = {f.name: types[f.name] for f in dataclasses.fields(cls)}

    def convert(key: str, value, kind):
        origin, args = get_origin(kind), get_args(kind)
        if origin in (Union, UnionType):
            if value is None and NoneType in args:
                return None
            for arg in (a for a in args if a is not NoneType):
                with contextlib.suppress(UsageError):
                    return convert(key, value, arg)
            raise UsageError(f"{key}: {value!r} is not a {' or '.join(getattr(a, '__name__', str(a)) for a in args)}")
        if origin is Literal:
            if value not in args:
                raise UsageError(f"{key}: expected one of {', '.join(map(str, args))} (got {value!r})")
            return value
        if origin is list:
            return [convert(key, item, args[0]) for item in _as_list(value)]
        if kind is bool and isinstance(value, bool) or kind is str and isinstance(value, str):
            return value
        if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML read `model=7` as a number
        if kind in (int, float) and not isinstance(value, bool):
            with contextlib.suppress(ValueError, TypeError):
                number = kind(value)
                if kind is float or float(value) == number:
                    return number
        raise UsageError(f"{key}: expected {kind.__name__} (got {value!r})")

    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise UsageError(f"unknown option '{unknown[0]}'; known: {', '.join(hints)}")
    try:
        return cls(**{key: convert(key, value, hints[key]) for key, value in raw.items()})
    except ValueError as e:
        raise UsageError(str(e)) from None
