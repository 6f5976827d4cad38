"""The fuzzer's worker process: runs `losia` commands in-process, one case per JSON line on stdin,
one result per JSON line on the channel given as argv[1] (a file descriptor).

In-process, so the CLI's imports (torch, transformers, datasets) are paid once, not per case; in a
process of its own, so that a case which hangs where no Python signal handler runs (C code) or eats
the memory (reading /dev/zero) is killed by the parent (fuzz/harness.py) without taking pytest with
it. A case that hangs where Python code runs is stopped here by SIGALRM after its timeout.
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import sys
import tempfile
import traceback

# Reading /dev/zero into memory must fail here, not exhaust the (shared) machine.
MEMORY_LIMIT = 8 << 30


class Timeout(BaseException):
    """Raised by SIGALRM; a BaseException, so that the CLI's `except Exception` cannot swallow it."""


def _alarm(signum, frame):
    raise Timeout


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    with os.fdopen(os.dup(fd), "rb") as f:
        return f.read().decode(errors="replace")


def run_case(main, case: dict) -> dict:
    """Run `main(case["argv"])` in case["cwd"] with case["stdin"]; its exit code, output and any
    exception that escaped it. C-level writes to fds 1 and 2 are captured too."""
    os.chdir(case["cwd"])
    saved = os.dup(1), os.dup(2)
    out_fd, err_fd = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    os.dup2(out_fd.fileno(), 1)
    os.dup2(err_fd.fileno(), 2)
    out, err = io.StringIO(), io.StringIO()
    streams = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(case.get("stdin", "")), out, err
    code, escaped = None, None
    signal.setitimer(signal.ITIMER_REAL, case["timeout"])
    try:
        code = main(case["argv"])
    except SystemExit as e:  # argparse's usage errors exit 2; sys.exit("text") is 1
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Timeout:
        code = "hang"
    except BaseException:  # what the CLI would have let out as a traceback
        escaped = traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdin, sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
    result = {"code": code, "out": out.getvalue() + _read_fd(out_fd.fileno()),
              "err": err.getvalue() + _read_fd(err_fd.fileno()), "escaped": escaped}
    out_fd.close()
    err_fd.close()
    return result


def serve() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    channel = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    signal.signal(signal.SIGALRM, _alarm)
    from losia_cli.cli import main

    import torch  # noqa: F401  (what the commands import anyway: paid before the first case's clock)
    import transformers  # noqa: F401

    channel.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        channel.write(json.dumps(run_case(main, json.loads(line))) + "\n")


if __name__ == "__main__":
    serve()
