import math
import os
import time

import pytest

from losia_cli.data import get_task
from losia_cli.eval import sandbox
from losia_cli.eval.code import build_program, pass_at_k, score_code
from losia_cli.eval.command import load_rows
from losia_cli.eval.runner import render_items
from losia_cli.eval.sandbox import CodeExecutionNotAllowed, run_code


def humaneval_items(limit: int | None = None) -> list[dict]:
    """HumanEval problems as `losia eval` renders them (package:humaneval through the data pipeline)."""
    return render_items("humaneval", load_rows("humaneval", limit)[1])


def test_all_humaneval_canonical_solutions_pass():
    items = humaneval_items()
    assert len(items) == 164
    result = score_code(items, [[item["target"]] for item in items], allow_code_exec=True, workers=4)
    failed = [s["task_id"] for s in result["samples"] if not s["correct"]]
    assert failed == [] and result["metrics"]["pass@1"] == 1.0


def test_wrong_humaneval_solution_fails():
    item = humaneval_items(1)[0]
    result = score_code([item], [["    return False\n"]], allow_code_exec=True)
    assert result["metrics"]["pass@1"] == 0.0 and result["samples"][0]["status"] == "failed"


def test_mbpp_row():
    row = {"task_id": 2, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
           "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], "test_setup_code": ""}
    item = get_task("mbpp").render_eval(row)
    result = score_code([item, item], [[row["code"]], ["def add(a, b):\n    return a - b"]], allow_code_exec=True)
    assert [s["correct"] for s in result["samples"]] == [True, False]
    assert "add(1, 2)" in item["prompt"] and build_program(item, "X").startswith("X")


@pytest.mark.parametrize("program,status", [
    ("while True:\n    pass", "timeout"),
    ("import os, time\nif os.fork() == 0:\n    time.sleep(60)\nwhile True:\n    pass", "timeout"),
    ("x = bytearray(10**12)", "oom"),
    ("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))", "oom"),
    ("raise SystemExit(3)", "error"),
    ("assert 1 == 2", "failed"),
])
def test_bad_programs_fail_cleanly(program, status):
    start = time.perf_counter()
    result = run_code(program, allow_code_exec=True, timeout_s=3, memory_mb=256)
    assert result.status == status and not result.passed
    assert time.perf_counter() - start < 10


def test_output_is_truncated_and_cwd_is_the_sandbox_tmp():
    result = run_code("import os\nprint(os.getcwd())\nprint('x' * 100000)", allow_code_exec=True,
                      max_output_bytes=1000)
    assert result.passed and result.stdout.startswith("/tmp\n") and result.stdout.endswith("[truncated]")


def test_refused_without_the_sandbox_unless_unsafe(monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_unavailable", lambda: "unshare: unshare failed: Operation not permitted")
    with pytest.raises(CodeExecutionNotAllowed, match="allow_code_exec=unsafe") as err:
        run_code("print(1)", allow_code_exec=True)
    assert "Operation not permitted" in str(err.value) and len(str(err.value).splitlines()) == 1
    result = run_code("import os\nprint(os.path.exists('/etc/passwd'))", allow_code_exec="unsafe")
    assert result.passed and result.stdout == "True\n"  # unsafe: the host is visible


def test_the_probe_says_why_the_sandbox_is_unavailable(monkeypatch):
    failing = ["sh", "-c", "echo 'unshare: unshare failed: Operation not permitted' >&2; exit 1"]
    monkeypatch.setattr(sandbox, "_unshare_command", lambda args: failing)
    sandbox.sandbox_unavailable.cache_clear()
    try:
        assert sandbox.sandbox_unavailable() == "unshare: unshare failed: Operation not permitted"
    finally:
        sandbox.sandbox_unavailable.cache_clear()


def test_refuses_without_allow_code_exec():
    with pytest.raises(CodeExecutionNotAllowed, match="allow_code_exec=true"):
        run_code("print(1)")
    with pytest.raises(CodeExecutionNotAllowed, match="allow_code_exec=true"):
        score_code(humaneval_items(1), [["    return True\n"]])


@pytest.mark.parametrize("n,c,k,expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (5, 2, 2, 1 - 3 / 10),  # C(3,2)/C(5,2) = 3/10
    (10, 0, 5, 0.0), (10, 8, 5, 1.0), (20, 1, 10, 0.5), (4, 1, 3, 1 - 1 / 4), (4, 2, 3, 1.0),  # n - c < k -> 1
    (6, 2, 3, 1 - 4 / 20),  # C(4,3)/C(6,3)
])
def test_pass_at_k(n, c, k, expected):
    assert math.isclose(pass_at_k(n, c, k), expected)


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_pass_at_k_in_score_code():
    item = humaneval_items(1)[0]
    good, bad = item["target"], "    return None\n"
    result = score_code([item], [[good, bad, bad, bad]], allow_code_exec=True, ks=(1, 2, 10))
    assert math.isclose(result["metrics"]["pass@1"], 0.25)
    assert math.isclose(result["metrics"]["pass@2"], 1 - 3 / 6)
    assert "pass@10" not in result["metrics"]


def test_code_from_chat_reply_takes_the_fenced_block_and_keeps_the_signature():
    from losia_cli.eval.code import code_from_reply

    item = {"prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
            "tests": "def check(f):\n    assert f(2, 3) == 5\n"}
    whole = code_from_reply(item, "Sure!\n```python\ndef add(a, b):\n    return a + b\n```\nDone.")
    assert whole == "def add(a, b):\n    return a + b\n"
    body_only = code_from_reply(item, "```python\n    return a + b\n```")
    assert body_only.startswith(item["prompt"])
    for code in (whole, body_only):
        result = run_code(build_program({**item, "completion_only": True}, code), allow_code_exec=True)
        assert result.passed, result.stderr


def test_cgroups_left_by_a_killed_evaluator_are_removed():
    if (parent := sandbox._memory_cgroup_parent()) is None:
        pytest.skip("no memory cgroup to create here")
    stale, recent = (os.path.join(parent[0], f"losia-sandbox-test{os.getpid()}-{age}") for age in ("old", "new"))
    for path in (stale, recent):
        os.mkdir(path)
    os.utime(stale, (time.time() - 120, time.time() - 120))
    try:
        assert run_code("print(1)", allow_code_exec=True).passed
        assert not os.path.exists(stale) and os.path.exists(recent)  # a recent one may be joining
    finally:
        for path in (stale, recent):
            if os.path.exists(path):
                os.rmdir(path)


def test_the_sweep_survives_a_cgroup_removed_under_it(monkeypatch):
    """Sandboxes run in parallel threads: one may remove its own cgroup between another's glob and stat."""
    if (parent := sandbox._memory_cgroup_parent()) is None:
        pytest.skip("no memory cgroup to create here")
    vanished = os.path.join(parent[0], f"losia-sandbox-test{os.getpid()}-gone")
    real_glob = sandbox.glob.glob
    monkeypatch.setattr(sandbox.glob, "glob", lambda pattern: [vanished, *real_glob(pattern)])
    assert run_code("print(1)", allow_code_exec=True).passed
