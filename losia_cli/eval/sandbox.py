"""Run untrusted generated code in a subprocess: temp dir as cwd, isolated interpreter, time limit
(the whole process group is killed), address-space and file-size limits, no network, bounded output.

Network: a new network namespace (`unshare --net`, available when running as root) when it works
here, and in every case a guard that replaces the socket constructors before user code runs.
Limits are set by the child itself before user code runs rather than in `preexec_fn`, which is
unsafe in a threaded parent (the code evaluator runs many sandboxes from a thread pool).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from losia_cli.errors import LosiaError

STATUSES = ("passed", "failed", "timeout", "oom", "error")


class CodeExecutionNotAllowed(LosiaError, PermissionError):
    """Raised when generated code would run without an explicit opt-in."""

    def __init__(self, what: str = "this evaluation"):
        super().__init__(
            f"{what} executes model-generated code; pass allow_code_exec=true to allow it "
            "(it runs sandboxed: subprocess, time/memory limits, no network)"
        )


@dataclass
class ExecResult:
    status: str  # one of STATUSES
    duration_s: float
    returncode: int | None
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs in the child before the user's program; argv: limits, then the program path.
_BOOTSTRAP = r"""
import resource, socket, sys
mem, fsize = int(sys.argv[1]), int(sys.argv[2])
if mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the losia sandbox")

class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _no_network()

socket.socket = _NoSocket
for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname",
              "gethostbyname_ex", "gethostbyaddr", "fromfd", "socketpair"):
    setattr(socket, _name, _no_network)
import _socket
_socket.socket = _NoSocket
del resource, socket, _socket, _name
path = sys.argv[3]
sys.argv = [path]
import runpy
runpy.run_path(path, run_name="__main__")
"""


@functools.cache
def network_namespace_available() -> bool:
    """Whether `unshare --net` can give the child a network namespace without interfaces."""
    try:
        return subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _read_head(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + "\n...[truncated]" if len(data) > limit else text


def _classify(returncode: int, stderr: str) -> str:
    if returncode == 0:
        return "passed"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if "MemoryError" in last or returncode == -signal.SIGKILL:
        return "oom"
    if last.startswith("AssertionError"):
        return "failed"
    return "error"


def run_code(
    program: str,
    *,
    allow_code_exec: bool = False,
    timeout_s: float = 10.0,
    memory_mb: int = 2048,
    max_output_bytes: int = 8192,
    max_file_mb: int = 16,
    isolate_network: bool = True,
) -> ExecResult:
    """Run `program` (Python source) in a sandboxed subprocess and report how it ended."""
    if not allow_code_exec:
        raise CodeExecutionNotAllowed()
    with tempfile.TemporaryDirectory(prefix="losia-sandbox-") as tmp:
        work = Path(tmp)
        (work / "program.py").write_text(program)
        cmd = [sys.executable, "-I", "-c", _BOOTSTRAP, str(memory_mb << 20), str(max_file_mb << 20),
               "program.py"]
        if isolate_network and network_namespace_available():
            cmd = ["unshare", "--net", *cmd]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        start = time.perf_counter()
        with open(work / ".stdout", "wb") as out, open(work / ".stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Kill the whole group either way: the program may have left children behind.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        duration = time.perf_counter() - start
        stdout = _read_head(work / ".stdout", max_output_bytes)
        stderr = _read_head(work / ".stderr", max_output_bytes)
    status = "timeout" if timed_out else _classify(proc.returncode, stderr)
    return ExecResult(status, duration, None if timed_out else proc.returncode, stdout, stderr)
