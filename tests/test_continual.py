"""Continual learning (`stages:`): transfer metrics, stage configs, the orchestration and resume."""

from __future__ import annotations

import json

import pytest
import yaml

from losia_cli.cli import main
from losia_cli.compose import load_config
from losia_cli.config import RunConfig
from losia_cli.errors import ConfigError
from losia_cli.continual import (
    backward_transfer,
    forgetting,
    run_continual,
    stage_config,
    task_specs,
)

RECIPE = "smollm2_135m_continual"


# --- the metrics, on hand-made matrices -----------------------------------------------------------
def test_backward_transfer_and_forgetting_one_task_per_stage():
    matrix = [[0.5, None, None],
              [0.3, 0.6, None],
              [0.2, 0.4, 0.9]]
    learned = [0, 1, 2]
    # BWT = mean(a[2][0] - a[0][0], a[2][1] - a[1][1]) = mean(-0.3, -0.2)
    assert backward_transfer(matrix, learned) == pytest.approx(-0.25)
    # forgetting_j = max over rows before the last (since learning j) - last
    assert forgetting(matrix, learned) == pytest.approx({0: 0.5 - 0.2, 1: 0.6 - 0.4})


def test_forgetting_takes_the_best_earlier_score_not_the_first():
    matrix = [[0.5, None, None],
              [0.7, 0.6, None],  # task 0 improved after stage 2: positive transfer first
              [0.4, 0.8, 0.9]]
    learned = [0, 1, 2]
    assert backward_transfer(matrix, learned) == pytest.approx(((0.4 - 0.5) + (0.8 - 0.6)) / 2)
    assert forgetting(matrix, learned) == pytest.approx({0: 0.7 - 0.4, 1: 0.6 - 0.8})


def test_metrics_with_two_tasks_in_a_stage_and_partial_matrices():
    learned = [0, 0, 1]  # stage 0 teaches two tasks
    matrix = [[0.4, 0.8, None], [0.1, 0.9, 0.5]]
    assert backward_transfer(matrix, learned) == pytest.approx(((0.1 - 0.4) + (0.9 - 0.8)) / 2)
    assert forgetting(matrix, learned) == pytest.approx({0: 0.3, 1: -0.1})
    # After the first stage nothing has been learned before the last row: nothing to report.
    assert backward_transfer(matrix[:1], learned) is None and forgetting(matrix[:1], learned) == {}


# --- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["losia_pro", "lora"])
def test_continual_recipe_composes_into_valid_stage_configs(method):
    cfg = load_config([f"recipe={RECIPE}", f"method={method}", "run.name=cont"])
    assert [s.name for s in cfg.stages] == ["math", "code", "commonsense"]
    stages = [stage_config(cfg, i, cfg.model.name_or_path) for i in range(3)]
    assert [s.data.task for s in stages] == ["gsm8k", "mbpp", "siqa"]
    assert stages[2].data.train_on_input and not stages[1].data.train_on_input  # merged on the base
    assert [s.run_dir().as_posix() for s in stages] == [
        "runs/cont/stage-1-math", "runs/cont/stage-2-code", "runs/cont/stage-3-commonsense"]
    assert all(s.stages is None and not s.eval.after_train and s.method.name == method for s in stages)
    assert stage_config(cfg, 1, "/w/stage1").model.name_or_path == "/w/stage1"


def _with_stages(cfg: RunConfig, stages: list[dict]) -> RunConfig:
    from losia_cli.config import validate

    return validate({**cfg.model_dump(), "stages": stages})


def test_stage_mistakes_name_the_key(tiny_config):
    base = tiny_config("keys")
    with pytest.raises(ConfigError, match=r"stages\.1\.data\.sourcee: Extra inputs"):
        _with_stages(base, [{"name": "a", "eval_tasks": ["gsm8k"]},
                            {"name": "b", "data": {"sourcee": "x"}, "eval_tasks": ["gsm8k"]}])
    with pytest.raises(ConfigError, match=r"stages\.0\.train\.max_steps: Input should be a valid integer"):
        _with_stages(base, [{"name": "a", "train": {"max_steps": "many"}, "eval_tasks": ["gsm8k"]}])
    with pytest.raises(ConfigError, match=r"stages\.0\.eval_tasks"):
        _with_stages(base, [{"name": "a"}])
    # Range checks apply to the merged section, before anything runs.
    cfg = _with_stages(base, [{"name": "a", "train": {"max_steps": 0}, "eval_tasks": ["gsm8k"]}])
    with pytest.raises(ConfigError, match=r"stages\.0\.train\.max_steps: Input should be greater than 0"):
        run_continual(cfg)
    # One eval set per task name, or the matrix's columns would be ambiguous.
    two = _with_stages(base, [{"name": "a", "eval_tasks": ["gsm8k@bundled:gsm8k_sample"]},
                              {"name": "b", "eval_tasks": ["gsm8k@/data/gsm8k.jsonl"]}])
    with pytest.raises(ConfigError, match=r"stages\.1\.eval_tasks: task gsm8k"):
        task_specs(two.stages)


def test_cli_reports_a_bad_stage_in_one_line(capsys, tmp_path):
    code = main(["train", f"recipe={RECIPE}", "stages.2.train.max_steps=0", f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "stages.2.train.max_steps" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


# --- the orchestration, on the tiny Llama ---------------------------------------------------------
STAGES = [
    {"name": "math", "data": {"task": "gsm8k", "source": "bundled:gsm8k_sample"}, "train": {"max_steps": 1},
     "eval_tasks": ["gsm8k@bundled:gsm8k_sample"]},
    {"name": "commonsense", "data": {"task": "boolq", "source": "bundled:boolq_sample", "train_on_input": True},
     "train": {"max_steps": 2}, "eval_tasks": ["boolq@bundled:boolq_sample"]},
]


@pytest.fixture
def continual_config(tiny_config):
    def make(*overrides: str) -> RunConfig:
        base = tiny_config("cont", "method=lora", "eval.limit=2", "eval.max_new_tokens=4", "eval.batch_size=2",
                           *overrides)
        return _with_stages(base, STAGES)

    return make


def test_continual_run_trains_in_sequence_and_writes_the_matrix(continual_config, capsys):
    cfg = continual_config()
    root = run_continual(cfg)
    doc = json.loads((root / "continual.json").read_text())
    assert doc["method"] == "lora" and doc["complete"]
    assert doc["tasks"] == ["gsm8k", "boolq"] and doc["metrics"] == {"gsm8k": "exact_match", "boolq": "acc"}
    assert [s["name"] for s in doc["stages"]] == ["math", "commonsense"]
    assert len(doc["initial"]) == 2 and all(isinstance(v, float) for v in doc["initial"])
    # Seen tasks are scored after each stage; boolq is unseen after stage 1.
    assert doc["matrix"][0][0] is not None and doc["matrix"][0][1] is None
    assert all(v is not None for v in doc["matrix"][1])
    assert doc["backward_transfer"] == pytest.approx(doc["matrix"][1][0] - doc["matrix"][0][0])
    assert doc["per_task_forgetting"] == {"gsm8k": pytest.approx(doc["matrix"][0][0] - doc["matrix"][1][0])}
    # Stage 2 starts from stage 1's merged LoRA weights, and trains its own data and steps.
    stage1, stage2 = (root / "stage-1-math"), (root / "stage-2-commonsense")
    assert (stage1 / "merged" / "MANIFEST.json").is_file()
    config2 = yaml.safe_load((stage2 / "config.yaml").read_text())
    assert config2["model"]["name_or_path"] == str(stage1 / "merged")
    assert config2["data"]["task"] == "boolq" and json.loads((stage2 / "report.json").read_text())["total_steps"] == 2
    assert json.loads((stage2 / "eval" / "results.json").read_text())["tasks"].keys() == {"gsm8k", "boolq"}
    # The loss probe sees every stage's data, unseen ones included.
    assert len(doc["data_loss"]["initial"]) == 2 and all(len(row) == 2 for row in doc["data_loss"]["matrix"])
    assert "backward transfer" in capsys.readouterr().out

    # Rerunning without resume refuses to clobber it.
    with pytest.raises(ConfigError, match="already exists"):
        run_continual(cfg)

    # A crash after stage 1's evaluation: stage 2 never finished, the file has one row.
    report1 = (stage1 / "report.json").stat().st_mtime_ns
    doc["matrix"], doc["complete"] = doc["matrix"][:1], False
    doc["general_text_loss"]["after_stage"] = doc["general_text_loss"]["after_stage"][:1]
    doc["data_loss"]["matrix"] = doc["data_loss"]["matrix"][:1]
    (root / "continual.json").write_text(json.dumps(doc))
    (stage2 / "report.json").unlink()
    run_continual(continual_config("run.resume=auto"))
    resumed = json.loads((root / "continual.json").read_text())
    assert resumed["complete"] and len(resumed["matrix"]) == 2
    assert (stage1 / "report.json").stat().st_mtime_ns == report1  # stage 1 was not trained again
    assert (stage2 / "report.json").is_file()
    assert "stage 1 math: finished, skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_continual_recipe_runs_on_smollm2(capsys, tmp_path):
    code = main([
        "train", f"recipe={RECIPE}", "data.max_length=96", *(f"stages.{i}.train.max_steps=1" for i in range(3)),
        "stages.1.data.max_length=96", "eval.limit=1", "eval.max_new_tokens=8", "eval.forgetting=false",
        f"run.output_dir={tmp_path}", "run.name=cont",
    ])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "cont" / "continual.json").read_text())
    assert doc["complete"] and doc["method"] == "losia_pro" and len(doc["matrix"]) == 3
    assert doc["tasks"] == ["gsm8k", "mbpp", "siqa"] and doc["matrix"][2].count(None) == 0
    assert doc["backward_transfer"] is not None and set(doc["per_task_forgetting"]) == {"gsm8k", "mbpp"}
