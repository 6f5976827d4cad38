"""Runs sandbox programs as the test's own user and, when that is root (as in CI), as `nobody` too:
the sandbox takes another path for a non-root user (a user namespace, dropped capabilities)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

import losia_cli
from losia_cli.eval.sandbox import ExecResult, run_code

REPO = os.path.dirname(os.path.dirname(os.path.abspath(losia_cli.__file__)))
NOBODY = 65534
SECRET = "losia-evaluator-secret-3f9a1c"  # in the evaluator's environment, never in the sandbox's
USERS = ["self", pytest.param("nobody", marks=pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop"))]

# The evaluator as `nobody`: in a private mount namespace, root first makes the interpreter
# reachable for nobody (it may live under a 0700 home: a 0755 tmpfs covers the closed directory
# and the prefix is moved back onto it), then drops to nobody and evaluates the program.
_AS_NOBODY = r"""
import os, subprocess, sys
for i, prefix in enumerate(sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)})):
    parts = prefix.split("/")
    closed = next(("/".join(parts[:n]) for n in range(2, len(parts)) if not os.stat("/".join(parts[:n])).st_mode & 1), None)
    if closed:
        stage = f"/tmp/.nobody-stage-{os.getpid()}-{i}"
        os.makedirs(stage)
        for cmd in (["mount", "--bind", prefix, stage], ["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", closed]):
            subprocess.run(cmd, check=True)
        os.makedirs(prefix, exist_ok=True)
        subprocess.run(["mount", "--move", stage, prefix], check=True)
        os.rmdir(stage)
os.setgroups([])
os.setgid(%d)
os.setuid(%d)
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
""" % (NOBODY, NOBODY)

_EVALUATE = r"""
import dataclasses, json, os, sys
from losia_cli.eval.sandbox import run_code
program, kwargs, secret = json.loads(sys.stdin.read())
os.environ["LOSIA_TEST_SECRET"] = secret
result = run_code(program.replace("EVALUATOR_PID", str(os.getpid())), allow_code_exec=True, **kwargs)
print(json.dumps(dataclasses.asdict(result)))
"""


def run_as(user: str, program: str, tmpdir: str = "/tmp", **kwargs) -> ExecResult:
    """Run `program` in the sandbox from an evaluator running as `user` ("self" or "nobody") with
    SECRET in its environment and its temp files in `tmpdir`; EVALUATOR_PID in the program becomes
    that evaluator's pid."""
    if user == "self":
        os.environ["LOSIA_TEST_SECRET"] = SECRET
        tempfile.tempdir = tmpdir
        try:
            return run_code(program.replace("EVALUATOR_PID", str(os.getpid())), allow_code_exec=True, **kwargs)
        finally:
            del os.environ["LOSIA_TEST_SECRET"]
            tempfile.tempdir = None
    cmd = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _AS_NOBODY, _EVALUATE]
    env = {**os.environ, "PYTHONPATH": REPO, "HOME": "/tmp", "TMPDIR": tmpdir}
    proc = subprocess.run(cmd, input=json.dumps([program, kwargs, SECRET]), capture_output=True, text=True,
                          env=env, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return ExecResult(**json.loads(proc.stdout))
