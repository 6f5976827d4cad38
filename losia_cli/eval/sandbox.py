"""Run untrusted generated code in a sandbox and report how it ended.

Each program runs as PID 1 of its own PID, mount, network, IPC and UTS namespaces (`unshare` from
util-linux; a non-root user also gets a user namespace, which is what lets it mount). Inside, a set-up
step builds a new root: read-only binds of the system and Python directories, a fresh /proc that
shows only the sandbox, a few /dev nodes and a size-limited tmpfs at /tmp, the only writable place;
it chroots there and drops every privilege before the program starts:
- the program cannot see or signal the evaluator, and when it exits (or the evaluator kills it at
  the time limit) the kernel kills every process left in its PID namespace, setsid ones included;
- no network: the namespace has no interfaces, whatever Python-level trick the program uses;
- as root it runs as a fresh unprivileged uid; as a non-root user its capabilities are dropped
  (empty bounding set, no_new_privs), so it cannot remount, chroot out or regain them;
- limits: RLIMIT_NPROC per sandbox (each sandbox has its own uid or user namespace, so the count is
  its own), RLIMIT_AS per process, RLIMIT_FSIZE, no core files; `memory_mb` bounds the whole
  program (all processes and /tmp) through a memory cgroup of its own where the evaluator can
  create one (cgroup v1, or v2 with the memory controller delegated; in practice as root), and
  otherwise each process only, so at most `max_processes * memory_mb` plus the `tmpfs_mb` of /tmp;
- the program's source goes in over stdin and its output to unlinked files the evaluator opened, so
  nothing the program deletes or rewrites in its own directory affects the evaluation.

Where these namespaces are unavailable, running code is refused unless the user passes
`allow_code_exec=unsafe`, which keeps only the time limit and the rlimits.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from losia_cli.errors import CodeExecutionNotAllowed

STATUSES = ("passed", "failed", "timeout", "oom", "error")


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


# PID 1 of the sandbox, run by the evaluator's interpreter before the program: builds the new root,
# chroots, sets the limits, drops privileges and execs a fresh interpreter on the program (stdin).
# argv: new-root mountpoint, uid to become (-1: stay, drop capabilities), memory, file size,
# process count, /tmp size (bytes), python, the cgroup.procs file to join ("-": none), then the
# read-only binds; symlinks as "link=target".
_SETUP = r"""
import ctypes, os, resource, sys
root, uid, mem, fsize, nproc, tmp_size, python = sys.argv[1], *map(int, sys.argv[2:7]), sys.argv[7]
if sys.argv[8] != "-":  # first, so that every process of the sandbox counts against the cgroup
    with open(sys.argv[8], "w") as f:
        f.write("0")
libc = ctypes.CDLL(None, use_errno=True)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC = 1, 2, 4, 8, 32, 4096, 16384
ST_KEEP = {8: NOEXEC, 1024: 1024, 2048: 2048, 4096: 1 << 21}  # flags a remount must keep in a userns

def mount(src, dst, fstype=None, flags=0, data=None):
    if libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), flags,
                  data and data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {dst}: {os.strerror(err)}")

def prctl(option, arg):  # fails closed: a privilege that cannot be dropped stops the sandbox
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {arg})")

def bind_ro(src, dst):
    os.makedirs(dst if os.path.isdir(src) else os.path.dirname(dst), exist_ok=True)
    if not os.path.isdir(src):
        open(dst, "a").close()
    mount(src, dst, None, BIND | REC)
    keep = sum(flag for st, flag in ST_KEEP.items() if os.statvfs(src).f_flag & st)
    mount(None, dst, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV | keep)

program = sys.stdin.buffer.read()
os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
mount("tmpfs", root, "tmpfs", NOSUID | NODEV, "size=1m,mode=755")
# /tmp before the binds: an interpreter that lives under /tmp (a venv in a clone there) is bound inside it.
os.mkdir(root + "/tmp")
owner = max(uid, 0)
mount("tmpfs", root + "/tmp", "tmpfs", NOSUID | NODEV, f"size={tmp_size},mode=700,uid={owner},gid={owner}")
with open(root + "/tmp/program.py", "wb") as f:
    f.write(program)
os.chown(root + "/tmp/program.py", owner, owner)
for spec in sys.argv[9:]:
    link, _, target = spec.partition("=")
    if target:
        os.symlink(target, root + link)
    else:
        bind_ro(link, root + link)
for dev in ("null", "zero", "random", "urandom"):
    bind_ro("/dev/" + dev, f"{root}/dev/{dev}")
os.mkdir(root + "/proc")
mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)
mount(None, root, None, REMOUNT | RDONLY | NOSUID | NODEV)
os.chroot(root)
os.chdir("/tmp")
os.setsid()  # kill(0, ...) from the program reaches only the sandbox
for limit, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NPROC, nproc)):
    if value >= 0:
        resource.setrlimit(limit, (value, value))
if uid >= 0:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # leaving uid 0 clears every capability
else:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):  # root of a user namespace: an empty bounding set leaves none after exec
        prctl(24, cap)  # PR_CAPBSET_DROP
prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: re-arms --kill-child, which a uid change clears
prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
os.execv(python, [python, "-I", "program.py"])
"""

# Unsafe mode: only the limits, then the program (read from the current directory).
_LIMITS_ONLY = r"""
import resource, runpy, sys
mem, fsize = int(sys.argv[1]), int(sys.argv[2])
if mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
"""

_UID_BASE = 1 << 30  # as root each sandbox gets its own uid from here, owning no file on the host
_next_uid = itertools.count()


def _sandbox_uid() -> int:
    """A uid of its own for each concurrent sandbox, so each counts its processes apart."""
    return _UID_BASE + ((os.getpid() & 0xFFFF) << 12 | next(_next_uid) & 0xFFF)


@functools.cache
def _read_only_binds() -> tuple[str, ...]:
    """What the new root shows, read-only: the system directories (top-level symlinks kept as
    symlinks), then the interpreter's prefixes, which may live anywhere (as spelled and resolved)."""
    binds = ["/usr", "/etc/ld.so.cache"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            binds.append(f"{top}={os.readlink(top)}")
        elif os.path.isdir(top):
            binds.append(top)
    prefixes = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    for prefix in sorted(prefixes | {os.path.realpath(p) for p in prefixes}):
        if not any(prefix == b or prefix.startswith(b + "/") for b in binds):
            binds.append(prefix)
    return tuple(b for b in binds if "=" in b or os.path.exists(b))


@functools.cache
def _memory_cgroup_parent() -> tuple[str, str] | None:
    """(directory, limit file) of the memory cgroup under which this evaluator can create one child
    per sandbox: cgroup v1's memory hierarchy, or v2 with the memory controller delegated. None where
    there is none (typically as a non-root user): then only RLIMIT_AS bounds each process."""
    with open("/proc/self/cgroup") as f:
        entries = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, path in entries:
        if "memory" in controllers.split(","):
            parent, limit_file = "/sys/fs/cgroup/memory" + path, "memory.limit_in_bytes"
        elif controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            parent, limit_file = "/sys/fs/cgroup" + path.rstrip("/"), "memory.max"
        else:
            continue
        probe = os.path.join(parent, f"losia-probe-{os.getpid()}-{threading.get_ident()}")
        try:
            os.mkdir(probe)
        except OSError:
            continue
        usable = os.path.exists(os.path.join(probe, limit_file))
        os.rmdir(probe)
        if usable:
            return parent, limit_file
    return None


def _new_memory_cgroup(name: str, limit_bytes: int) -> str | None:
    """A fresh cgroup limiting the memory of a whole sandbox (all its processes and its /tmp)."""
    if (parent := _memory_cgroup_parent()) is None:
        return None
    for stale in glob.glob(os.path.join(parent[0], "losia-sandbox-*")):
        # Left by an evaluator killed mid-run: a live sandbox joins its cgroup within milliseconds,
        # and rmdir refuses a cgroup that still holds processes. A concurrent sandbox may remove its
        # own between the glob and the stat.
        with contextlib.suppress(OSError):
            if time.time() - os.stat(stale).st_mtime > 60:
                os.rmdir(stale)
    group = os.path.join(parent[0], name)
    os.mkdir(group)
    with open(os.path.join(group, parent[1]), "w") as f:
        f.write(str(limit_bytes))
    return group


def _remove_cgroup(group: str) -> None:
    """Remove a sandbox's cgroup once the kernel has reaped its processes (rmdir fails until then)."""
    for _ in range(500):
        try:
            os.rmdir(group)
            return
        except OSError:
            time.sleep(0.01)


def _unshare_command(python_args: list[str]) -> list[str]:
    """`unshare` into fresh namespaces; a non-root user needs a user namespace to mount in it.
    --kill-child: if `unshare` dies (the evaluator kills it at the time limit), so does PID 1."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child",
            sys.executable, "-I", "-S", "-c", _SETUP, *python_args]


def _read_head(f, limit: int) -> str:
    f.seek(0)
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


def _execute(program: str, unsafe: bool, timeout_s: float, memory_mb: int, max_output_bytes: int,
             max_file_mb: int, max_processes: int, tmpfs_mb: int) -> ExecResult:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory(prefix="losia-sandbox-") as tmp, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        limits, cgroup = [str(memory_mb << 20), str(max_file_mb << 20)], None
        if unsafe:
            with open(os.path.join(tmp, "program.py"), "w") as f:
                f.write(program)
            cmd = [sys.executable, "-I", "-c", _LIMITS_ONLY, *limits]
        else:  # tmp stays empty: it is only where the sandbox mounts its new root
            uid = _sandbox_uid() if os.geteuid() == 0 else -1
            cgroup = _new_memory_cgroup(os.path.basename(tmp), memory_mb << 20)
            cmd = _unshare_command([tmp, str(uid), *limits, str(max_processes), str(tmpfs_mb << 20),
                                    sys.executable, os.path.join(cgroup, "cgroup.procs") if cgroup else "-",
                                    *_read_only_binds()])
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env={**env, "HOME": tmp} if unsafe else env,
                                stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True)
        timed_out = False
        try:
            proc.communicate(b"" if unsafe else program.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # Unsafe mode: the program's children share its process group. Sandboxed: killing
            # `unshare` kills PID 1, and with it the whole PID namespace.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            if cgroup:
                _remove_cgroup(cgroup)
        duration = time.perf_counter() - start
        stdout, stderr = _read_head(out, max_output_bytes), _read_head(err, max_output_bytes)
    status = "timeout" if timed_out else _classify(proc.returncode, stderr)
    return ExecResult(status, duration, None if timed_out else proc.returncode, stdout, stderr)


@functools.cache
def sandbox_unavailable() -> str | None:
    """Why the sandbox cannot run here (None when it can): probed once by running a program in it."""
    try:
        result = _execute("print('ok')", False, 30, 512, 4096, 1, 16, 1)
    except OSError as e:  # no `unshare` binary
        return str(e)
    if result.stdout == "ok\n":
        return None
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def require_code_exec(allow_code_exec: bool | str, what: str = "this evaluation") -> None:
    """Raise CodeExecutionNotAllowed unless code may run: opted into, and sandboxed unless "unsafe"."""
    if not allow_code_exec:
        raise CodeExecutionNotAllowed(what)
    if allow_code_exec != "unsafe" and (reason := sandbox_unavailable()):
        raise CodeExecutionNotAllowed(what, reason)


def run_code(
    program: str,
    *,
    allow_code_exec: bool | str = False,
    timeout_s: float = 10.0,
    memory_mb: int = 2048,
    max_output_bytes: int = 8192,
    max_file_mb: int = 16,
    max_processes: int = 32,
    tmpfs_mb: int = 64,
) -> ExecResult:
    """Run `program` (Python source) in the sandbox and report how it ended. allow_code_exec:
    true runs it sandboxed (refused where the sandbox is unavailable); "unsafe" runs it with only
    the time and rlimit limits (the program can then reach the network, files and processes)."""
    require_code_exec(allow_code_exec)
    return _execute(program, allow_code_exec == "unsafe", timeout_s, memory_mb, max_output_bytes, max_file_mb, max_processes,
                    tmpfs_mb)
