"""One entry point for `losia eval`: render rows through the task registry (when the data pipeline
provides it), then score them by kind: generate (answer extraction), multiple_choice
(log-likelihood), code (sandboxed execution)."""

from __future__ import annotations

from losia_cli.eval.code import HUMANEVAL_STOP, chat_prompt, code_from_reply, score_code
from losia_cli.eval.extract import answers_match, extract_answer
from losia_cli.eval.generate import generate_samples
from losia_cli.eval.loglik import score_multiple_choice
from losia_cli.eval.results import mean_stderr
from losia_cli.eval.sandbox import require_code_exec


def render_items(task_name: str, rows: list[dict], tokenizer=None) -> list[dict]:
    """Eval items for `rows`: rows already rendered (they have a `kind`) pass through; otherwise
    the data pipeline's `get_task(task_name).render_eval(row)` renders them."""
    if all("kind" in row for row in rows):
        return list(rows)
    try:
        from losia_cli.data.tasks import get_task
    except ImportError as e:
        raise RuntimeError(f"task {task_name}: rows need rendering but the task registry is unavailable ({e})")
    task = get_task(task_name)
    return [task.render_eval(row, tokenizer) for row in rows]


def evaluate(model, tokenizer, task_name: str, rows: list[dict], *,
             allow_code_exec: bool | str = False, max_new_tokens: int = 256, batch_size: int = 16,
             num_samples: int = 1, temperature: float = 0.8, top_p: float = 0.95,
             ks: tuple[int, ...] = (1, 10, 100), stop: list[str] | None = None, workers: int = 4,
             timeout_s: float = 10.0, limit: int | None = None, seed: int = 0, chat: bool = False) -> dict:
    """Score `model` on `rows` of `task_name`. Returns {task, kind, metrics, stderr, n, config,
    samples}; metrics: exact_match (generate), acc/acc_norm (multiple_choice), pass@k (code).
    num_samples > 1 samples (temperature, top_p) instead of greedy decoding. chat=True (code tasks)
    asks an instruct model through its chat template and runs the code block of its reply."""
    items = render_items(task_name, rows, tokenizer)[:limit]
    if not items:
        raise ValueError(f"task {task_name}: no rows to evaluate")
    kinds = {item["kind"] for item in items}
    if len(kinds) != 1:
        raise ValueError(f"task {task_name}: mixed item kinds {sorted(kinds)}")
    kind = kinds.pop()
    if kind == "code":
        require_code_exec(allow_code_exec, f"task {task_name}")
    config = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, num_samples=num_samples,
                  temperature=temperature if num_samples > 1 else None,
                  top_p=top_p if num_samples > 1 else None, seed=seed, limit=limit)
    if kind == "multiple_choice":
        result = score_multiple_choice(model, tokenizer, items, batch_size=batch_size)
        config = {"batch_size": batch_size, "limit": limit}
    else:
        chat = chat and kind == "code"
        if stop is None:
            raw_completion = kind == "code" and not chat and not items[0].get("completion_only")
            stop = list(HUMANEVAL_STOP) if raw_completion else []
        config.update(stop=stop, chat=chat)
        prompts = [chat_prompt(tokenizer, item) if chat else item["prompt"] for item in items]
        outputs = generate_samples(
            model, tokenizer, prompts, num_samples=num_samples,
            max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop, do_sample=num_samples > 1,
            temperature=temperature, top_p=top_p, seed=seed,
        )
        if chat:
            outputs = [[code_from_reply(item, reply) for reply in replies] for item, replies in zip(items, outputs)]
            items = [{**item, "completion_only": True} for item in items]
        if kind == "code":
            result = score_code(items, outputs, allow_code_exec=allow_code_exec, ks=ks, workers=workers, timeout_s=timeout_s)
        else:
            result = _score_generations(items, outputs)
    return {"task": task_name, "kind": kind, **result, "config": config}


def _score_generations(items: list[dict], outputs: list[list[str]]) -> dict:
    correct, samples = [], []
    for item, outs in zip(items, outputs):
        for output in outs:
            answer = extract_answer(output)
            ok = answers_match(answer, item["reference"])
            correct.append(float(ok))
            samples.append({"prompt": item["prompt"], "output": output, "extracted": answer,
                            "reference": item["reference"], "correct": ok})
    return {"metrics": {"exact_match": sum(correct) / len(correct)},
            "stderr": {"exact_match": mean_stderr(correct)}, "n": len(items), "samples": samples}
