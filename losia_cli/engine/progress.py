"""Training progress: a rich live bar in a terminal, one plain line per logged step otherwise."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def describe(m: dict) -> str:
    return (
        f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['tokens_per_s']:,.0f} tok/s  "
        f"{m['step_time_s']:.2f} s/step  mem {human_bytes(m['peak_mem_bytes'])}"
    )


class TrainProgress:
    def __init__(self, console: Console, total: int, start: int = 0, enabled: bool = True):
        self.console, self.total, self.start = console, total, start
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=describe(metrics))
            return
        done = step - self.start
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        print(f"step {step}/{self.total}  {describe(metrics)}  eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
