"""Override words (`key=value`, `~key`, `+key=`, `group=option`) drawn from the run schema's own fields.

Every field of the pydantic run config and of each method's config dataclass is a leaf with a type and
the bounds its Field declares. A case is one word (two for a method's key: `method=NAME` picks the
config that has it) and what it must do: `INVALID` words (a wrong type, out of the declared or the
meant range, broken quoting, a dangling interpolation, an unknown key or group option) exit 2 naming
the key; the rest (right types, huge, unicode, empty text, edits) exit 0 or 2.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass
from typing import Literal, Union, get_args, get_origin, get_type_hints

from hypothesis import strategies as st
from pydantic import BaseModel

from fuzz.harness import ANY, INVALID

# Ranges the schema does not declare but the meaning fixes (issue #22): these values train silently
# wrong (a negative clip norm flips the gradient, eps 0 divides by zero, ...).
MEANT = {
    "train.max_grad_norm": lambda v: v > 0,  # null disables clipping
    "train.eps": lambda v: v > 0,
    "eval.temperature": lambda v: v >= 0,
    "eval.top_p": lambda v: 0 < v <= 1,
}
MEANT_BAD = {"train.max_grad_norm": ["-0.5", "0"], "train.eps": ["-1", "0", "1e-400"],
             "eval.temperature": ["-3"], "eval.top_p": ["0", "1.5", "-1"]}
# Strings with a fixed set of meanings that the schema types as `str`.
MEANT_CHOICES = {"model.attn_implementation": {"sdpa", "eager", "flash_attention_2", "flash_attention_3",
                                                "flex_attention", "paged_attention"}}
# Fields naming a path: random text there must not name the filesystem root or a home dir (hashing
# `/` as a data source is a hang of its own, found once and kept out of the random draws).
PATHS = {"model.name_or_path", "data.source", "data.val_source", "data.template", "data.chat_template",
         "run.output_dir", "run.resume", "eval.include_path"}
GROUPS = ("model", "data", "method", "train", "dist", "recipe")
# Hydra's override grammar cannot read these values.
BROKEN_SYNTAX = ["'abc", '"abc', "[1,2", "{a:1", "${", "a]b", "[a,,b]", "{a}", "'a'b'", "(1,2)"]
DANGLING = ["${fuzz_nope}", "${train.fuzz_nope}", "${oc.env:LOSIA_FUZZ_UNSET}"]
BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0", "t", "f", "y", "n"}  # what pydantic reads as bool


@dataclass(frozen=True)
class Leaf:
    key: str  # dotted, as on the command line
    kind: object  # the annotation, `| None` taken off
    optional: bool  # null is a valid value
    required: bool
    bounds: tuple[tuple[str, float], ...]  # ("gt", 0), ... from the Field
    method: str | None = None  # a method's key: `method=<this>` picks the config that has it


@dataclass(frozen=True)
class Case:
    words: tuple[str, ...]
    expect: str  # INVALID or ANY
    names: tuple[str, ...]  # an exit-2 message names one of these


def _strip_none(annotation) -> tuple[object, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) < len(get_args(annotation)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return annotation, False


def _bounds(metadata) -> tuple:
    return tuple((name, getattr(m, name)) for m in metadata for name in ("gt", "ge", "lt", "le")
                 if getattr(m, name, None) is not None)


def _section(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def schema_leaves() -> list[Leaf]:
    """Every settable leaf of the run schema and of every method's config."""
    from losia_cli.config import RunConfig
    from losia_cli.methods import config_classes

    leaves = []

    def walk(prefix: str, model: type[BaseModel]):
        for name, info in model.model_fields.items():
            kind, optional = _strip_none(info.annotation)
            key = f"{prefix}{name}"
            if _section(kind):
                walk(f"{key}.", kind)
            elif key not in ("method", "recipe"):  # picked as groups (`method=lora`), not set as values
                leaves.append(Leaf(key, kind, optional, info.is_required(), _bounds(info.metadata)))

    walk("", RunConfig)
    for cls in config_classes():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "name":
                continue
            kind, optional = _strip_none(hints[f.name])
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            for method in get_args(hints["name"]):  # one config class may serve several (lora, dora, pissa)
                leaves.append(Leaf(f"method.{f.name}", kind, optional, required, (), method))
    return leaves


def _shape(kind) -> str:
    origin = get_origin(kind)
    if kind in (bool, int, float, str):
        return kind.__name__
    if origin is Literal:
        return "literal"
    if origin is list:
        return "models" if _section(get_args(kind)[0]) else "list"
    return {dict: "dict", tuple: "tuple"}.get(origin, "other")


def _wrong_types(leaf: Leaf) -> list[str]:
    """Values of a type the field never takes."""
    shape = _shape(leaf.kind)
    common = ["{a:1}"] if shape != "dict" else ["[a,b]", "5"]
    return common + {
        "int": ["abc", "1.5", "true", "[1,2]", "''", "", "nan"],
        "float": ["abc", "true", "[1,2]", "''", "", "nan"],  # NaN: no field means anything by it
        "bool": ["maybe", "2", "0.5", "[true]", "''", ""],
        "literal": ["fuzz_nope", "[a]", "7"] + ([] if "" in get_args(leaf.kind) else ["''"]),
        "str": ["[a,b]"],
        "list": [],
        "dict": ["abc"],
        "tuple": ["[0.9]", "[a,b]", "abc", "[0.9,0.9,0.9]"],
        "models": ["5", "abc"],
    }.get(shape, [])


def _out_of_range(leaf: Leaf) -> list[str]:
    """Values outside the field's declared bounds, and the meant ranges above."""
    shape = _shape(leaf.kind)
    if shape not in ("int", "float"):
        return []
    out = list(MEANT_BAD.get(leaf.key, []))
    for name, bound in leaf.bounds:
        step = 1 if shape == "int" else 0.5
        if name == "gt":
            out += [repr(bound), repr(bound - step), "-1000000"]
        elif name == "ge":
            out += [repr(bound - step)]
        elif name == "lt":
            out += [repr(bound), repr(bound + step)]
        elif name == "le":
            out += [repr(bound + step)]
    if shape == "int":
        out += ["true", "false"]  # a bool is not a count or a seed (seed=true was read as 1)
    return out


def _in_range(leaf: Leaf, value: float) -> bool:
    checks = {"gt": lambda b: value > b, "ge": lambda b: value >= b, "lt": lambda b: value < b, "le": lambda b: value <= b}
    return all(checks[name](bound) for name, bound in leaf.bounds) and MEANT.get(leaf.key, lambda v: True)(value)


_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)


def _text(key: str):
    text = _TEXT
    if key in PATHS:
        text = text.filter(lambda s: not s.strip().startswith(("/", "~")))
    return text


def _may_values(leaf: Leaf):
    """Values that may be valid: the right type (any size), and spellings Hydra reads its own way."""
    shape = _shape(leaf.kind)
    by_shape = {
        "int": st.integers(-(10**30), 10**30).map(str),
        "float": st.floats(allow_nan=False).map(repr),
        "bool": st.sampled_from(sorted(BOOL_WORDS)),
        "literal": st.sampled_from([str(a) for a in get_args(leaf.kind)]),
        "list": st.lists(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), max_size=3).map(lambda v: f"[{','.join(v)}]"),
    }
    huge = st.integers(1_000, 30_000).map(lambda n: "a" * n)  # a file name too long for the OS, a 20k-char template
    texts = st.one_of(_text(leaf.key), _text(leaf.key).map(lambda s: "'" + s.replace("'", "\\'") + "'"), huge)
    return st.one_of(by_shape.get(shape, texts), texts, st.sampled_from(["null", "", "${oc.env:HOME}", "${seed}"]))


def _value_case(leaf: Leaf, word: str, expect: str) -> Case:
    words = (f"method={leaf.method}",) if leaf.method else ()
    leaf_name = leaf.key.split(".")[-1]  # "dist: machine_rank 5 must be < ..." names it too; "lr" alone is too short to tell
    names = (leaf.key, *([leaf_name] if len(leaf_name) >= 5 else []))
    if leaf.key in PATHS or expect == ANY:
        names += tuple(w for w in (word.strip("'\""),) if len(w) >= 3)  # a path, named as a file
    return Case((*words, f"{leaf.key}={word}"), expect, names)


@st.composite
def value_cases(draw, leaves: list[Leaf]) -> Case:
    """key=value words for one leaf: certainly invalid ones, or ones that may be valid."""
    leaf = draw(st.sampled_from(leaves))
    invalid = _wrong_types(leaf) + _out_of_range(leaf) + BROKEN_SYNTAX + DANGLING
    if leaf.key in MEANT_CHOICES:
        invalid += ["bogus", "sdpa2"]
    if not leaf.optional:
        invalid.append("null")
    if draw(st.booleans()):
        return _value_case(leaf, draw(st.sampled_from(invalid)), INVALID)
    word = draw(_may_values(leaf))
    return _value_case(leaf, word, _judge(leaf, word))


def _judge(leaf: Leaf, word: str) -> str:
    """A drawn value that turns out to be certainly invalid all the same (out of range, a wrong type)."""
    shape = _shape(leaf.kind)
    if word == "null":
        return ANY if leaf.optional else INVALID
    if word in ("", "''") and shape in ("int", "float", "bool"):
        return INVALID
    if shape in ("int", "float"):
        try:
            value = float(word)
        except ValueError:
            return ANY
        if math.isinf(value) and shape == "float":
            return ANY  # inf: no clipping, no limit; a field may take it
        if not math.isinf(value) and not _in_range(leaf, value):
            return INVALID
    if leaf.key in MEANT_CHOICES and word.strip("'") and word.strip("'") not in MEANT_CHOICES[leaf.key] \
            and not set("/|${") & set(word):  # a hub kernel (org/repo), paged|..., an interpolation may be valid
        return INVALID
    return ANY


@st.composite
def edit_cases(draw, leaves: list[Leaf]) -> Case:
    """Group options, unknown keys, deletions (~key), appends (+key=, ++key=) and hydra.* keys."""
    leaf = draw(st.sampled_from([leaf for leaf in leaves if not leaf.method]))
    ident = draw(st.from_regex(r"fuzz_[a-z]{1,6}", fullmatch=True))
    group = draw(st.sampled_from(GROUPS))
    section = leaf.key.split(".")[0]
    choices = [
        Case((f"{section}.{ident}=1",), INVALID, (f"{section}.{ident}",)),
        Case((f"~{leaf.key}",), INVALID if leaf.required else ANY, (leaf.key,)),
        Case((f"{group}={draw(st.sampled_from(['1', ident, '[a]', '']))}",), INVALID, (group,)),
        Case((f"+{leaf.key}=1",), ANY, (leaf.key,)),
        Case((f"{ident}=1",), INVALID, (ident,)),
        Case((f"~{section}.{ident}",), INVALID, (f"{section}.{ident}",)),
        Case((f"++{leaf.key}=1",), ANY, (leaf.key,)),
        Case((f"+{section}.{ident}.x=1",), INVALID, (f"{section}.{ident}", f"{section}:")),
        Case((f"{draw(st.sampled_from(['hydra.job.chdir=true', 'hydra.verbose=true', 'hydra.output_subdir=x']))}",),
             ANY, ("hydra",)),
    ]
    return draw(st.sampled_from(choices))


def issue_cases() -> list[Case]:
    """The override cases issue #22 reported, run every time besides the drawn ones."""
    invalid = [
        ("train=1", "train"), ("data.source=", "data.source"), ("data.chat_template=" + "a" * 20_000, "data.chat_template"),
        ("model.attn_implementation=bogus", "model.attn_implementation"),
        ("train.max_grad_norm=-0.5", "train.max_grad_norm"), ("train.max_grad_norm=nan", "train.max_grad_norm"),
        ("train.eps=-1", "train.eps"), ("train.eps=1e-400", "train.eps"), ("eval.temperature=-3", "eval.temperature"),
        ("eval.temperature=nan", "eval.temperature"), ("eval.top_p=nan", "eval.top_p"), ("seed=true", "seed"),
        ("dist.num_processes=true", "dist.num_processes"), ("hydra.run.dir=/", "hydra.run.dir"), ("~train.lr", "train.lr"),
        ("train.lr=[", "train.lr"), ("data.source=${nonexistent_key}", "data.source"),
        ("train.lr=${oc.env:LOSIA_FUZZ_UNSET}", "train.lr"), ("data.val_source='a b c'", "data.val_source"),
    ]
    return [Case((word,), INVALID, (key,)) for word, key in invalid]


def override_cases(leaves: list[Leaf]):
    return st.one_of(value_cases(leaves), value_cases(leaves), edit_cases(leaves))
