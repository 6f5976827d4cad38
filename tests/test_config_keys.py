"""Every schema key settable as key=value (no Hydra `+`), one-file configs, `recipes cp` to one file."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import BaseModel, TypeAdapter

from losia_cli.cli import main
from losia_cli.compose import load_config
from losia_cli.config import RunConfig, field_docs
from losia_cli.errors import ConfigError, UsageError
from losia_cli.methods import method_names


def _literal(value) -> str:
    """A value in the override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"  # Hydra escapes backslashes only before quotes
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_literal, value)) + "]"
    return "{" + ",".join(f"{k}:{_literal(v)}" for k, v in value.items()) + "}"


def _leaves(section, prefix: str = ""):
    """(dotted key, value) for every field of the schema, nested sections (and the method's) walked."""
    dumped = TypeAdapter(type(section)).dump_python(section, mode="json")
    for name in field_docs(type(section)):
        value = getattr(section, name)
        if isinstance(value, BaseModel) or dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", dumped[name]


@pytest.mark.parametrize("method", method_names())
def test_every_schema_key_is_settable(method):
    """Each field of every section and of this method's config, set on the command line at once;
    the YAML groups spell out only some of them (e.g. data.packing, train.betas)."""
    base = load_config(["recipe=smollm2_135m_math", f"method={method}"], quiet=True)
    words = [f"{key}={_literal(value)}" for key, value in _leaves(base) if key != "recipe"]
    assert {"data.packing", "train.betas", "model.trust_remote_code", "data.column_map"} <= {
        w.split("=")[0] for w in words}
    cfg = load_config(["recipe=smollm2_135m_math", f"method={method}", *words], quiet=True)
    assert cfg == base


def test_keys_missing_from_the_yaml_take_new_values():
    cfg = load_config(["data.packing=true", "data.column_map={question:instruction}", "train.betas=[0.8,0.9]",
                       "data.encoding=latin-1", "train.eval_every=3"], quiet=True)
    assert cfg.data.packing and cfg.data.column_map == {"question": "instruction"}
    assert cfg.train.betas == (0.8, 0.9) and cfg.data.encoding == "latin-1" and cfg.train.eval_every == 3
    assert load_config(["data.column_map.question=instruction"], quiet=True).data.column_map == {"question": "instruction"}


@pytest.mark.parametrize("word", ["data.bogus=1", "train.lrr=1", "bogus=1", "data.column_map.a.b=1"])
def test_unknown_keys_are_still_refused(word):
    with pytest.raises(UsageError, match=f"unknown key '{word.split('=')[0]}'"):
        load_config([word])


def test_recipes_cp_writes_one_commented_file_that_trains_as_the_recipe(tmp_path, capsys):
    dest = tmp_path / "my.yaml"
    assert main(["recipes", "cp", "smollm2_135m_math", str(dest)]) == 0
    text = dest.read_text()
    assert "# Peak learning rate (AdamW).\n  lr: " in text and "recipe: smollm2_135m_math" in text
    documented = [line for line in text.splitlines() if line.strip().startswith("#")]
    assert len(documented) > 60
    assert load_config([str(dest)], quiet=True) == load_config(["recipe=smollm2_135m_math"], quiet=True)
    assert main(["recipes", "cp", "smollm2_135m_math", str(dest)]) == 2  # never overwritten
    assert main(["recipes", "validate", str(dest), "train.lr=3e-4", "--debug"]) == 0
    assert "ok keys and types" in capsys.readouterr().out


def test_every_field_is_documented():
    """`recipes cp` writes a comment per key: every field of every section has a description."""
    def undocumented(cls, prefix=""):
        for name, doc in field_docs(cls).items():
            kind = cls.model_fields[name].annotation if issubclass(cls, BaseModel) else None
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from undocumented(kind, f"{prefix}{name}.")
            elif not doc and name != "name":
                yield prefix + name

    from losia_cli.methods import config_classes
    missing = [*undocumented(RunConfig), *(k for c in config_classes() for k in undocumented(c, "method."))]
    assert missing == []


def test_one_file_config_on_a_base_recipe(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("recipe: smollm2_135m_math\nmethod: lora\ndata: {packing: true}\ntrain: {lr: 3.0e-4}\n")
    cfg = load_config([str(path), "train.lr=1e-3"], quiet=True)
    assert cfg.method.name == "lora" and cfg.data.packing and cfg.train.lr == 1e-3  # the command line wins
    assert cfg.data.source == "bundled:gsm8k_sample"  # the rest from the recipe
    path.write_text("recipe: smollm2_135m_math\nmethod: {name: lora, rank: 4}\n")
    assert load_config([str(path), "method=full"], quiet=True).method.name == "full"  # replaces the section


def test_one_file_config_standing_alone(tmp_path):
    path = tmp_path / "alone.yaml"
    path.write_text("model: {name_or_path: some/dir}\ndata: {task: alpaca, source: rows.jsonl}\n"
                    "method: {name: lora, rank: 4}\ntrain: {max_steps: 3}\n")
    cfg = load_config([str(path), "train.lr=1e-3"], quiet=True)
    assert cfg.recipe is None and cfg.method.rank == 4 and cfg.train.lr == 1e-3
    assert cfg.train.micro_batch_size == 4 and cfg.data.max_length == 512  # the schema's defaults


@pytest.mark.parametrize("text, message", [
    ("recipe: smollm2_135m_math\ntrian: {lr: 1}\n", "unknown key 'trian'"),
    ("- a\n- b\n", "expected a mapping"),
    ("recipe: smollm2_135m_math\ntrain: {lr: -1}\n", "train.lr"),
])
def test_bad_one_file_configs_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises((UsageError, ConfigError), match=message):
        load_config([str(path)], quiet=True)


def test_train_takes_a_config_file_from_the_command_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such config file" in capsys.readouterr().err


def test_sweeps_set_schema_keys_the_yaml_leaves_out():
    """`losia train -m` composes through Hydra's own launcher: schema keys go as ++key (set or add)."""
    from losia_cli.compose import sweep_words

    assert sweep_words(["method=lora,full", "data.packing=true,false", "train.lr=1e-4", "bogus=1"]) == [
        "method=lora,full", "++data.packing=true,false", "++train.lr=1e-4", "bogus=1"]


def test_recipe_on_the_command_line_replaces_the_files_base(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("recipe: smollm2_135m_math\ntrain: {lr: 3.0e-4}\n")
    cfg = load_config([str(path), "recipe=gemma3_270m_math"], quiet=True)
    assert cfg.recipe == "gemma3_270m_math" and cfg.train.lr == 3e-4
