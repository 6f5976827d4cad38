"""Functional-correctness evaluation of generated code: HumanEval and MBPP-format rows, programs run
through the sandbox from a small worker pool, pass@1 and the unbiased pass@k estimator."""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor

from losia_cli.eval.results import mean_stderr
from losia_cli.eval.sandbox import ExecResult, require_code_exec, run_code

# Codex/HumanEval stop sequences: a completion ends where the next top-level statement begins.
# "\n```" ends the completion where an instruct model closes a markdown code block it never opened.
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", "\n```")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) for n samples, c correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


CHAT_INSTRUCTION = "Complete the following Python code. Reply with the whole code in one ```python block.\n\n"
_FENCED = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", re.S)


def chat_prompt(tokenizer, item: dict) -> str:
    """The code task as one user turn of the tokenizer's chat template (for instruct models)."""
    messages = [{"role": "user", "content": CHAT_INSTRUCTION + item["prompt"]}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def code_from_reply(item: dict, reply: str) -> str:
    """A whole program from a chat reply: the first fenced block (or the reply), with the task's
    prompt in front when the reply does not define the entry point itself."""
    match = _FENCED.search(reply)
    code = match.group(1) if match else reply
    entry = item.get("entry_point")
    if entry and f"def {entry}" not in code:
        code = item["prompt"] + code
    return code


def build_program(item: dict, completion: str) -> str:
    """The program to run: prompt + completion (or the completion alone for whole-solution
    tasks), the tests, and `check(entry_point)` when the task names an entry point."""
    body = completion if item.get("completion_only") else item["prompt"] + completion
    program = f"{body}\n\n{item['tests']}\n"
    if item.get("entry_point"):
        program += f"\ncheck({item['entry_point']})\n"
    return program


def run_programs(
    programs: list[str], *, allow_code_exec: bool | str = False, workers: int = 4, **sandbox_kwargs
) -> list[ExecResult]:
    """Run each program in its own sandbox, `workers` at a time; results in input order.
    allow_code_exec: as in `run_code` (true: sandboxed; "unsafe": without the sandbox)."""
    require_code_exec(allow_code_exec, "code evaluation")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_code(p, allow_code_exec=allow_code_exec, **sandbox_kwargs), programs))


def score_code(
    items: list[dict],
    completions: list[list[str]],
    *,
    allow_code_exec: bool | str = False,
    ks: tuple[int, ...] = (1,),
    workers: int = 4,
    **sandbox_kwargs,
) -> dict:
    """Run every completion of every item; pass@k (mean over items) for each k <= samples/item.
    Returns {metrics, stderr, n, samples} with one sample record per completion."""
    flat = [(i, c) for i, cs in enumerate(completions) for c in cs]
    results = run_programs([build_program(items[i], c) for i, c in flat],
                           allow_code_exec=allow_code_exec, workers=workers, **sandbox_kwargs)
    correct = [0] * len(items)
    samples = []
    for (i, completion), result in zip(flat, results):
        correct[i] += result.passed
        samples.append({"task_id": items[i].get("task_id"), "prompt": items[i]["prompt"],
                        "output": completion, "status": result.status, "correct": result.passed,
                        "stderr": result.stderr[-1000:]})
    metrics, stderr = {}, {}
    n_min = min(len(cs) for cs in completions)
    for k in ks:
        if k > n_min:
            continue
        per_item = [pass_at_k(len(cs), c, k) for cs, c in zip(completions, correct)]
        metrics[f"pass@{k}"] = sum(per_item) / len(per_item)
        stderr[f"pass@{k}"] = mean_stderr(per_item)
    return {"metrics": metrics, "stderr": stderr, "n": len(items), "samples": samples}

