"""The `losia` command in-process: recipes, validation and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from losia_cli.cli import main
from losia_cli.compose import load_config, recipe_names, sweep_words

PAPER_RECIPES = {"gemma2b_math", "llama2_7b_math", "llama2_7b_code", "llama2_7b_commonsense"}
OFFLINE_RECIPES = {"smollm2_135m_math", "gemma3_270m_math"}


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "losia train recipe=" in capsys.readouterr().out


def test_recipes_ls_lists_every_recipe(capsys):
    code, out, _ = run(capsys, "recipes", "ls")
    assert code == 0
    assert PAPER_RECIPES | OFFLINE_RECIPES <= set(recipe_names())
    for name in recipe_names():
        assert name in out


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES | OFFLINE_RECIPES))
def test_every_recipe_composes_and_validates(name):
    cfg = load_config([f"recipe={name}"])
    assert cfg.recipe == name
    assert cfg.method.name in {"losia", "losia_pro"}


def test_every_recipe_header_gives_its_command():
    from losia_cli.resources import recipes_dir

    for name in recipe_names():
        assert f"losia train recipe={name}" in (recipes_dir() / "recipe" / f"{name}.yaml").read_text()


def test_plain_train_uses_the_default_recipe():
    assert load_config([]).recipe == "smollm2_135m_math"


def test_command_line_beats_recipe():
    cfg = load_config(["recipe=gemma2b_math", "method=lora", "train.lr=1e-3"])
    assert cfg.method.name == "lora" and cfg.train.lr == 1e-3


def test_recipes_cat_shows_the_composed_config(capsys):
    code, out, _ = run(capsys, "recipes", "cat", "smollm2_135m_math")
    assert code == 0 and "name_or_path: package:smollm2-135m" in out


def test_recipes_cp_copies_a_usable_tree(capsys, tmp_path):
    code, _, _ = run(capsys, "recipes", "cp", "smollm2_135m_math", str(tmp_path / "mine"))
    assert code == 0
    cfg = load_config(["recipe=smollm2_135m_math"], tmp_path / "mine")
    assert cfg.recipe == "smollm2_135m_math"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "recipe=nope"], "unknown recipe 'nope'; available:"),
        (["train", "train.lrr=1"], "unknown key 'train.lrr'"),
        (["train", "train.lr=abc"], "train.lr:"),
        (["train", "method=nope"], "unknown method 'nope'"),
        (["train", "method.rank_factor=-1"], "method.rank_factor"),
        (["train", "data.source=/no/such/file.jsonl"], "/no/such/file.jsonl"),
        (["recipes", "cat", "nope"], "unknown recipe 'nope'"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, *argv, f"run.output_dir={tmp_path}" if argv[0] == "train" else "ls")
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out
    # One error line (a first run may also print the one-time model conversion note).
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]]
    assert len(err.strip().splitlines()) <= 2
    assert not any(tmp_path.iterdir())  # nothing that looks like a run


@pytest.mark.parametrize("word, message", [
    # Hydra's own errors, each naming the word it could not take
    ("train=1", "override 'train=1': train takes one option name; available: cpu_demo"),
    ("train.lr=[", "override 'train.lr=[': cannot parse"),
    ("+foo=[", "override '+foo=[': cannot parse"),
    ("~train.lr", "override '~train.lr': keys cannot be deleted"),
    ("hydra.run.dir=/", "override 'hydra.run.dir=/': losia manages its run dirs"),
    ("hydra.sweep.dir=/etc", "override 'hydra.sweep.dir=/etc': losia manages its run dirs"),
    ("train.lr=${nonexistent_key}", "train.lr: Interpolation key 'nonexistent_key' not found"),
    ("train.lr=${oc.env:LOSIA_TEST_UNSET_VARIABLE}", "train.lr: Environment variable 'LOSIA_TEST_UNSET_VARIABLE' not found"),
    # the schema's ranges: finite floats, strict numbers, non-empty strings
    ("data.source=", "data.source: String should have at least 1 character"),
    ("train.max_grad_norm=-0.5", "train.max_grad_norm: Input should be greater than 0"),
    ("train.max_grad_norm=nan", "train.max_grad_norm: Input should be a finite number"),
    ("train.eps=-1", "train.eps: Input should be greater than 0"),
    ("train.eps=1e-400", "train.eps: Input should be greater than 0 (got 0.0)"),
    ("train.betas=[0.9,1.5]", "train.betas.1: Input should be less than 1"),
    ("train.lr=inf", "train.lr: Input should be a finite number"),
    ("eval.temperature=-3", "eval.temperature: Input should be greater than 0"),
    ("eval.temperature=nan", "eval.temperature: Input should be a finite number"),
    ("eval.top_p=nan", "eval.top_p: Input should be a finite number"),
    ("seed=true", "seed: takes no true/false"),
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("dist.num_processes=true", "dist.num_processes: takes no true/false"),
    ("method.rank_factor=true", "method.rank_factor: takes no true/false"),
    ("method.rank_factor=nan", "method.rank_factor: Input should be a finite number"),
    ("model.attn_implementation=bogus", "model.attn_implementation: transformers knows eager, "),
])
def test_bad_override_is_one_line_naming_it(capsys, monkeypatch, word, message):
    monkeypatch.delenv("LOSIA_TEST_UNSET_VARIABLE", raising=False)
    code, out, err = run(capsys, "recipes", "validate", "smollm2_135m_math", word)
    assert code == 2 and "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), err


def test_a_name_with_a_newline_or_escape_stays_one_line(capsys, tmp_path, monkeypatch):
    # A one-file config whose name holds a newline and an ANSI escape: the message quotes the name
    # escaped, on one line, with no raw escape byte reaching the terminal.
    monkeypatch.chdir(tmp_path)
    name = "my\nx\x1b[2J.yaml"
    (tmp_path / name).write_text("defaults: [nope]\n")
    code, out, err = run(capsys, "recipes", "validate", name)
    assert code == 2 and "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "my\\nx\\x1b[2J.yaml" in lines[0] and "\x1b" not in err, err


def test_schema_keeps_the_values_it_should_take():
    """The checks above refuse only what is wrong: hub kernels, eager, group sweeps still pass."""
    cfg = load_config(["model.attn_implementation=kernels-community/flash-attn", "seed=0", "train.eps=1e-12"])
    assert cfg.model.attn_implementation == "kernels-community/flash-attn"
    assert load_config(["model.attn_implementation=eager"]).model.attn_implementation == "eager"
    assert sweep_words(["method=lora,full", "train.lr=1e-4,1e-3"])[0] == "method=lora,full"


def test_empty_dataset_fails_before_a_run_dir_looks_finished(capsys, tiny_llama_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run(
        capsys, "train", f"model.name_or_path={tiny_llama_dir}", f"data.source={empty}",
        f"run.output_dir={tmp_path / 'runs'}", "run.name=x",
    )
    assert code == 2 and str(empty) in err
    assert not (tmp_path / "runs" / "x" / "report.json").exists()


def test_validate_renders_samples_with_the_mask(capsys):
    code, out, _ = run(capsys, "recipes", "validate", "smollm2_135m_math")
    assert code == 0
    assert "sample 1" in out and "sample 2" in out


def test_validate_skips_hub_models_offline(capsys):
    code, out, _ = run(capsys, "recipes", "validate", "llama2_7b_math")
    assert code == 0 and "skipped" in out


@pytest.mark.slow
def test_default_recipe_trains_the_real_model(capsys, tmp_path):
    code, out, _ = run(
        capsys, "train", "train.max_steps=3", "data.max_length=96", f"run.output_dir={tmp_path}",
        "run.name=demo",
    )
    assert code == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["method"] == "losia_pro" and report["total_steps"] == 3
    assert (tmp_path / "demo" / "final" / "config.json").is_file()
    assert (tmp_path / "demo" / "subnets.jsonl").read_text().strip()
