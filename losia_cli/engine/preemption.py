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
        self.step = step


class StopRequest:
    """A flag set by the signals above while the training loop runs."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def listening(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread (e.g. inside tests)
            return

        def request(signum, frame):
            self.signum = signum

        previous = {sig: signal.signal(sig, request) for sig in PREEMPTION_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
