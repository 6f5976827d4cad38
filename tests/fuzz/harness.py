"""The fuzzer's parent side: the worker process, the property every case must hold, and the tally.

The property (issue #22): exit 0 or 2, never a traceback, never a hang; exit 2 with a message that
names the key or file at fault; a value that is certainly invalid exits 2 (else it was accepted
silently); the input run dir unchanged; nothing written outside the output dir given.
"""

from __future__ import annotations

import json
import os
import re
import select
import stat
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")
GRACE_S = 30  # past a case's own timeout (SIGALRM in the worker): a hang in C code, kill the worker
START_S = 600  # the worker's imports, on a machine other jobs share

# Expected outcomes of a case.
INVALID = "invalid"  # certainly bad input: exit 2
ANY = "any"  # may be valid: exit 0 or 2
VALID = "valid"  # certainly good input: exit 0


@dataclass
class Outcome:
    code: int | str | None  # exit code, "hang", or None when an exception escaped
    out: str = ""
    err: str = ""
    escaped: str | None = None  # the traceback of an exception that escaped `main`


class Worker:
    """One worker process (fuzz/worker.py) running cases in-process; restarted after a hang or a crash."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.proc = None

    def _start(self) -> None:
        read, write = os.pipe()
        self.proc = subprocess.Popen([sys.executable, str(WORKER), str(write)], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(write,),
                                     env=self.env, text=True)
        os.close(write)
        self.channel = os.fdopen(read, "r")
        if self._receive(START_S) is None:
            raise RuntimeError("the fuzz worker did not start (run tests/fuzz/worker.py by hand to see why)")

    def _receive(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.channel], [], [], timeout)
        line = self.channel.readline() if ready else ""
        return json.loads(line) if line else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.channel.close()
            self.proc = None

    def run(self, argv: list[str], cwd: Path, timeout: float, stdin: str = "") -> Outcome:
        if self.proc is None:
            self._start()
        case = {"argv": [str(a) for a in argv], "cwd": str(cwd), "timeout": timeout, "stdin": stdin}
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
            result = self._receive(timeout + GRACE_S)
        except BrokenPipeError:
            result = None
        if result is None:  # stuck in C code, or died (killed for memory, a crash in native code)
            died = self.proc.poll() is not None
            self.stop()  # the next case starts a fresh one
            return Outcome("hang") if not died else Outcome(None, escaped="the worker process died")
        return Outcome(**result)


def tree_state(root: Path) -> dict[str, tuple]:
    """What each path under `root` is, without reading contents: a write in place changes a file's size
    or mtime, a replacement its inode (run dirs are hard-linked copies, never edited in place here). A
    folder is only there or not: a temporary file made and removed in it changes nothing kept. A run's
    lock file (`.lock`, its holder's pid) is the lock's own business."""
    state = {}
    for path in [root, *root.rglob("*")] if root.exists() or root.is_symlink() else []:
        if path.name == ".lock":
            continue
        st = path.lstat()
        kind = stat.S_IFMT(st.st_mode)
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        state[str(path.relative_to(root))] = (kind,) if kind == stat.S_IFDIR else (
            kind, st.st_size, st.st_mtime_ns, st.st_ino, target)
    return state


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@dataclass
class Tally:
    """Cases run and failures found, grouped by kind and cause, each with one repro."""

    name: str
    cases: int = 0
    failures: dict[str, dict[str, list[str]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))

    KINDS = ("traceback", "hang", "bad exit code", "silent acceptance", "refused valid input", "unnamed",
             "changed input", "wrote outside")

    def fail(self, kind: str, cause: str, repro: str) -> None:
        self.failures[kind][cause].append(repro)

    def counts(self) -> dict[str, int]:
        return {kind: sum(map(len, self.failures[kind].values())) for kind in self.KINDS}

    def report(self, examples: int = 1) -> str:
        lines = [headline(self.name, self.cases, self.counts())]
        for kind in self.KINDS:
            for cause, repros in sorted(self.failures[kind].items(), key=lambda kv: -len(kv[1])):
                lines.append(f"  {kind} x{len(repros)}: {cause}")
                lines += [f"      {r}" for r in repros[:examples]]
        return "\n".join(lines)

    def check(self, outcome: Outcome, expect: str, names: list[str], repro: str,
              changed_input: list[str] = (), outside: list[str] = (), about: str = "certainly invalid input") -> None:
        """Hold one case's outcome to the property; `names`: what an exit-2 message must mention (one of);
        `about`: what the input was (silent acceptances are grouped by it)."""
        self.cases += 1
        err = outcome.err
        if outcome.escaped or "Traceback (most recent call last)" in err + outcome.out:
            self.fail("traceback", _cause(outcome.escaped or err), repro)
        elif outcome.code == "hang":
            self.fail("hang", "no exit within the case's timeout", repro)
        elif outcome.code not in (0, 2):
            self.fail("bad exit code", f"exit {outcome.code}: {_last_line(err)}", repro)
        elif outcome.code == 0 and expect == INVALID:
            self.fail("silent acceptance", f"exit 0 on {about}", repro)
        elif outcome.code == 2 and expect == VALID:
            self.fail("refused valid input", _last_line(err)[:160], repro)
        elif outcome.code == 2 and not any(n and n in err for n in names):
            self.fail("unnamed", _last_line(err)[:160], repro)
        if changed_input:
            self.fail("changed input", f"changed in the input run dir: {changed_input[0]}", repro)
        if outside:
            self.fail("wrote outside", f"written outside the output: {outside[0]}", repro)


def headline(name: str, cases: int, counts: dict[str, int]) -> str:
    return f"{name}: {cases} cases, " + ", ".join(f"{n} {kind}" for kind, n in counts.items())


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _cause(trace: str) -> str:
    """A traceback's exception line and the innermost losia frame: the group a failure is counted in."""
    frames = re.findall(r'File "([^"]*losia_cli[^"]*)", line (\d+), in (\w+)', trace)
    where = f" at {Path(frames[-1][0]).name}:{frames[-1][2]}" if frames else ""
    # The exception's own line: yaml and others add lines (a caret, a snippet) after it.
    raised = re.findall(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b.*$", trace, flags=re.M)
    return re.sub(r"0x[0-9a-f]+|\d{3,}", "N", raised[-1] if raised else _last_line(trace))[:140] + where


def repro_line(argv: list[str]) -> str:
    """The case as a command line a person can paste (long values shortened)."""
    import shlex

    def short(word: str) -> str:
        return word if len(word) <= 120 else f"{word[:60]}...<{len(word)} chars>"

    return "losia " + " ".join(shlex.quote(short(str(a))) for a in argv)
