"""Preemption: SIGUSR1 (Slurm's warning before the time limit) or SIGTERM (requeue, scancel) asks the
run to stop at the next step boundary, write a checkpoint and exit with PREEMPTED_EXIT_CODE, so a
requeued job continues with `run.resume=auto`."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later


class Preempted(Exception):
    """Raised by the training loop after the checkpoint of a preempted run is written."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}: checkpoint written; resume with run.resume=auto")


@contextlib.contextmanager
def handling(handler) -> Iterator[None]:
    """Route the preemption signals to `handler` inside the block (main thread only: elsewhere, e.g.
    inside some test runners, signal handlers cannot be set and the block runs without them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopRequest:
    """A flag set by the signals above while the training loop runs."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def listening(self) -> Iterator["StopRequest"]:
        def request(signum, frame):
            self.signum = signum

        with handling(request):
            yield self
