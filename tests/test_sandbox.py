"""Each attack a hostile program tried on the code sandbox, run from a root evaluator and from a
non-root one (`nobody`): every test here fails when the protection it names is removed."""

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
from sandbox_support import SECRET, USERS, run_as

from losia_cli.eval import sandbox

pytestmark = pytest.mark.parametrize("user", USERS)


@pytest.mark.parametrize("attack", ["os.kill(os.getppid(), signal.SIGKILL)", "os.kill(-1, signal.SIGKILL)",
                                    "os.kill(0, signal.SIGKILL)", "os.kill(EVALUATOR_PID, signal.SIGKILL)"])
def test_the_program_cannot_kill_the_evaluator(user, attack):  # PID namespace + setsid
    tmpdir = tempfile.mkdtemp(prefix="losia-test-")  # the evaluator's temp dirs go here, apart
    os.chmod(tmpdir, 0o777)
    result = run_as(user, f"import os, signal\ntry:\n    {attack}\nexcept OSError:\n    pass\nprint('alive')",
                    tmpdir=tmpdir)
    assert result.passed and result.stdout == "alive\n", result.stderr  # PID 1 of its namespace: unkillable from inside
    assert os.listdir(tmpdir) == []  # no temp dir leaked
    os.rmdir(tmpdir)


# Prefix the program with READ_END_PIPE: the sleeper's copy of the write end closes when it execs (os.pipe
# is close-on-exec), so this read returns only once `sleep 987.654` runs, however loaded the machine.
WAIT_FOR_EXEC = "os.close(w)\nos.read(r, 1)\n"
READ_END_PIPE = "import os\nr, w = os.pipe()\n"


def test_a_double_forked_setsid_child_dies_with_the_program(user):  # PID namespace
    program = (READ_END_PIPE + "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               "        os.execv('/bin/sleep', ['sleep', '987.654'])\n    os._exit(0)\n" + WAIT_FOR_EXEC + "print('done')")
    result = run_as(user, program)
    assert result.passed, result.stderr
    _assert_no_sleeper_left()


def test_nothing_outlives_a_timeout(user):  # --kill-child: PID 1, and with it the namespace, dies
    program = (READ_END_PIPE + "if os.fork() == 0:\n    os.execv('/bin/sleep', ['sleep', '987.654'])\n" + WAIT_FOR_EXEC
               + "import time\ntime.sleep(60)")  # sleeps, not spins: if the test fails, what is left idles
    assert run_as(user, program, timeout_s=3).status == "timeout"
    _assert_no_sleeper_left()


def _assert_no_sleeper_left() -> None:
    """No `sleep 987.654` left on the host (after a grace period for the kernel to reap it)."""
    deadline = time.monotonic() + 3
    while (found := _sleepers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in found:  # do not leave it behind when the test fails
        os.kill(pid, 9)
    assert not found


def _sleepers() -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == b"sleep\x00987.654\x00":
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_files_outside_the_temp_dir_can_be_neither_written_nor_deleted(user):  # mount ns + chroot
    outside = Path(tempfile.mkdtemp(prefix="losia-test-"))  # under /tmp, open to anyone (nobody too):
    outside.chmod(0o777)  # only the sandbox stands between the program and it
    victim = outside / "victim.txt"
    victim.write_text("keep")
    victim.chmod(0o666)
    program = f"""
import os
for attempt in (lambda: open({str(victim)!r}, "a").write("x"), lambda: os.remove({str(victim)!r}),
                lambda: open({str(outside / "new.txt")!r}, "w").write("x"),
                lambda: open("/usr/losia-new", "w").write("x"), lambda: open("/etc/losia-new", "w").write("x")):
    try:
        attempt()
        print("ESCAPED")
    except OSError:
        pass
open("inside.txt", "w").write("fine")  # its own temp dir stays writable
"""
    try:
        result = run_as(user, program)
        assert result.passed and "ESCAPED" not in result.stdout, result.stderr
        assert victim.read_text() == "keep" and sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    finally:
        shutil.rmtree(outside)


def test_host_files_and_the_evaluator_environment_are_not_readable(user):  # chroot + own /proc
    program = """
import os
for path in ("/etc/passwd", "/proc/EVALUATOR_PID/environ", "/proc/1/environ"):
    try:
        print(open(path, "rb").read().decode(errors="replace"))
    except OSError:
        pass
"""
    result = run_as(user, program)
    assert result.passed, result.stderr
    assert "root:" not in result.stdout and SECRET not in result.stdout


def test_a_chroot_escape_fails_without_capabilities(user):  # capabilities dropped
    program = """
import os
os.mkdir("jail")
os.chroot("jail")
for _ in range(64):
    os.chdir("..")
os.chroot(".")
print(open("/etc/passwd").read())
"""
    result = run_as(user, program)
    assert result.status == "error" and "PermissionError" in result.stderr and "root:" not in result.stdout


def test_fork_bomb_is_limited(user):  # RLIMIT_NPROC, counted per sandbox
    program = """
import os, time
started = 0
for _ in range(100):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        started += 1
    except OSError:
        break
print(started)
"""
    result = run_as(user, program, max_processes=12)
    assert result.passed, result.stderr
    assert int(result.stdout) < 12


def test_memory_is_limited_in_every_process(user):  # RLIMIT_AS, inherited by each child
    program = """
import os
pids = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        try:
            block = bytearray(300 << 20)
            os._exit(0)
        except MemoryError:
            os._exit(7)
    pids.append(pid)
print([os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids])
"""
    result = run_as(user, program, memory_mb=256)
    assert result.passed and result.stdout.strip() == "[7, 7, 7]", result.stderr


def test_memory_is_limited_for_the_whole_program(user):  # the sandbox's memory cgroup
    if user == "nobody" or sandbox._memory_cgroup_parent() is None:
        pytest.skip("no memory cgroup to create here: each process is limited on its own")
    program = """
import os, time
pids = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (150 << 20)  # written, so resident: 450 MB in all
        time.sleep(2)
        os._exit(0)
    pids.append(pid)
print([os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids])
"""
    result = run_as(user, program, memory_mb=256)
    assert result.status == "oom" or "-9" in result.stdout, (result.stdout, result.stderr)


def test_deleting_its_own_files_does_not_break_the_eval(user):  # output outside the program's reach
    # Files only: /tmp may also hold the (read-only) interpreter dirs of a clone that lives under /tmp.
    program = ("import os\nprint('kept')\nfor name in os.listdir('.'):\n    if os.path.isfile(name):\n"
               "        os.remove(name)\nos.chmod('.', 0)")
    result = run_as(user, program)
    assert result.passed and result.stdout == "kept\n", result.stderr


CONNECT = {
    "socket": "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=2)",
    "mro": "import socket\nraw = socket.socket.__mro__[-2]\ns = raw(socket.AF_INET, socket.SOCK_STREAM)\n"
           "s.settimeout(2)\ns.connect(('127.0.0.1', PORT))",
    "fresh_interpreter": "import subprocess, sys\nsubprocess.run([sys.executable, '-S', '-c', "
                         "\"import socket; socket.create_connection(('127.0.0.1', PORT), timeout=2)\"], check=True)",
}


@pytest.mark.parametrize("how", sorted(CONNECT))
def test_no_network_even_to_a_listening_local_port(user, how):  # network namespace
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = run_as(user, CONNECT[how].replace("PORT", str(port)) + "\nprint('CONNECTED')")
    assert result.status == "error" and "CONNECTED" not in result.stdout
