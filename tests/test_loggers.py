"""Optional loggers (`run.loggers`): what goes to metrics.jsonl also goes to TensorBoard / W&B."""

from __future__ import annotations

import importlib.util
import json
import struct
import time
from pathlib import Path

import pytest
import torch

from losia_cli.cli import main
from losia_cli.compose import load_config
from losia_cli.errors import ConfigError
from losia_cli.engine.records import RunRecords

CONFIG = {"run": {"name": "demo", "loggers": [], "wandb_project": "losia-test"},
          "train": {"lr": 1e-4, "betas": [0.9, 0.999]}, "method": {"name": "lora"}}
METRICS = [
    {"step": 1, "loss": 2.5, "lr": 1e-4, "lr_groups": [1e-4, 2e-4], "tokens_per_s": 100.0, "peak_mem_bytes": 7},
    {"step": 2, "loss": 2.0, "lr": 5e-5, "lr_groups": [5e-5, 1e-4], "tokens_per_s": 120.0, "peak_mem_bytes": 9},
]
REPORT = {"method": "lora", "final_loss": 2.0, "step_time_s": {"p50": 0.25, "p95": None}, "wall_s": 3.0}


def record_run(run_dir: Path, loggers: list[str]) -> None:
    records = RunRecords(run_dir)
    records.write_config({**CONFIG, "run": {**CONFIG["run"], "loggers": loggers}}, torch.device("cpu"))
    for metric in METRICS:
        records.metric(metric)
    records.write_report(REPORT)
    records.close()


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_metrics_and_report(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install 'losia-cli[tensorboard]')")
    record_run(tmp_path, ["tensorboard"])
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert scalars["train/tokens_per_s"] == [(1, 100.0), (2, 120.0)]
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([1e-4, 5e-5])
    assert scalars["report/final_loss"][0][1] == 2.0
    assert scalars["report/step_time_s/p50"][0][1] == 0.25
    assert not any(tag.startswith("train/lr_groups") or tag == "train/step" for tag in scalars)
    # metrics.jsonl is still the record: the logger is a copy.
    assert [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2.5, 2.0]


def test_training_run_logs_each_step_to_tensorboard(tiny_config):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install 'losia-cli[tensorboard]')")
    from losia_cli.workflow import train

    run_dir = train(tiny_config("tb", "method=lora", "train.max_steps=2", "run.loggers=[tensorboard]"))
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert scalars["train/loss"] == [(m["step"], pytest.approx(m["loss"])) for m in logged]
    report = json.loads((run_dir / "report.json").read_text())
    assert scalars["report/final_loss"][0][1] == pytest.approx(report["final_loss"])


def _hide(monkeypatch, module: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_missing_logger_package_is_one_clear_error(monkeypatch, capsys, tmp_path, logger):
    _hide(monkeypatch, logger)
    with pytest.raises(ConfigError, match=rf"run.loggers: .*pip install 'losia-cli\[{logger}\]'"):
        load_config([f"run.loggers=[{logger}]"])
    code = main(["train", f"run.loggers=[{logger}]", f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"losia-cli[{logger}]" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def wandb_records(path: Path) -> list:
    """Records of an offline W&B run file: a 7-byte header, then LevelDB-log records (crc32, length,
    type; one FULL record per entry in files this small) holding `Record` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and len(data) < 32768  # one LevelDB block: no split records
    records, pos = [], 7
    while pos + 7 <= len(data):
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (length == 0 and kind == 0) or pos + 7 + length > len(data):  # block padding, or still being written
            break
        assert kind == 1, "FULL record expected"
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data[pos + 7 : pos + 7 + length])
        records.append(record)
        pos += 7 + length
    return records


def test_wandb_offline_run_has_the_values(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'losia-cli[wandb]'); it is "
                        "not in the test extra: a heavy dependency tree and a background service")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    record_run(tmp_path, ["wandb"])
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb's background service may still be writing the file after finish() returns.
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_file)):
        assert time.monotonic() < deadline, "the offline run file never got its exit record"
        time.sleep(0.5)
    history, summary, config = [], {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
        elif kind == "run":  # the config travels with the run record
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    assert [(h["_step"], h["loss"]) for h in history] == [(1, 2.5), (2, 2.0)]
    assert "lr_groups" not in history[0]
    assert summary["final_loss"] == 2.0 and summary["step_time_s/p50"] == 0.25
    assert config["train"]["lr"] == 1e-4 and config["run"]["name"] == "demo"
