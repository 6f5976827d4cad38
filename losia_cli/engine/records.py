"""The run directory's records (docs/architecture.md, section 3): field names there are a contract.

JSONL files are line-buffered and flushed per record, so a crashed run stays readable up to its last
step; summaries (config.yaml, report.json) are written atomically. Optional trackers
(`run.loggers`, engine/loggers.py) get a copy of the metrics, the config and the report.
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import torch
import yaml

from losia_cli import atomic
from losia_cli.engine.loggers import open_loggers
from losia_cli.methods.base import Records
from losia_cli.provenance import versions


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


# Dense bf16 tensor-core peaks (FLOP/s) by GPU name; MFU is reported for these only.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def model_flops_utilisation(device, params: int, tokens_per_s: float, world: int) -> float | None:
    """6 N FLOPs per trained token (forward + full backward: the usual model-FLOPs convention, the
    same for every method, so a cheaper backward shows as a higher MFU) over the GPUs' bf16 peak."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
    return 6 * params * tokens_per_s / (peak * world) if peak else None


def step_timings(step_times: list[float], tokens: list[int]) -> dict:
    """p50/p95 step time and tokens/s of a run (report.json), leaving out the first step, which pays
    one-off warm-up costs (allocator, kernels)."""
    times, tokens = step_times[1:] or step_times, tokens[1:] or tokens
    return {
        "p50": percentile(times, 50),
        "p95": percentile(times, 95),
        "tokens_per_s": sum(tokens) / sum(times) if times and sum(times) > 0 else None,
    }


def percentile(values: list[float], q: int) -> float | None:
    """The q-th percentile, interpolated linearly between order statistics (numpy's default);
    report.json and `losia bench` both use it."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class BufferedRecords(Records):
    """Records held back until the run dir exists (a method's initial ones, written in prepare())."""

    def __init__(self):
        self.held: list[tuple[str, dict]] = []

    def write(self, stream: str, record: dict) -> None:
        self.held.append((stream, record))

    def replay(self, into: Records) -> None:
        for stream, record in self.held:
            into.write(stream, record)


class RunRecords(Records):
    """The run dir's records; also the sink a method writes its own streams to (subnets.jsonl)."""

    STREAMS = ("metrics", "subnets")

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._open()
        self._loggers: list = []  # opened by write_config, which knows run.loggers

    def _open(self) -> None:
        self._files = {name: open(self.dir / f"{name}.jsonl", "a", buffering=1) for name in self.STREAMS}

    def write_config(self, config: dict, device: torch.device) -> None:
        doc = {**config, "versions": versions(), "device": device_name(device)}
        atomic.write_text(self.dir / "config.yaml", yaml.safe_dump(doc, sort_keys=False))
        if not self._loggers:
            self._loggers = open_loggers(self.dir, doc)

    def metric(self, record: dict) -> None:
        self.write("metrics", record)
        for logger in self._loggers:
            logger.metric(record)

    def write(self, stream: str, record: dict) -> None:
        self._files[stream].write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the files read as one uninterrupted run
        (step=-1: all of them), and a last line a crash cut short (it has no newline yet)."""
        for f in self._files.values():
            f.close()
        for name in self.STREAMS:
            path = self.dir / f"{name}.jsonl"
            lines = path.read_text(errors="replace").split("\n")[:-1]  # [-1]: "" or the cut-short line
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            atomic.write_text(path, "".join(line + "\n" for line in kept))
        self._open()

    def write_report(self, report: dict) -> None:
        atomic.write_json(self.dir / "report.json", report)
        for logger in self._loggers:
            logger.summary(report)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        for logger in self._loggers:
            logger.close()
        self._loggers = []
