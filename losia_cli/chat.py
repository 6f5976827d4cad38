"""`losia chat` and `losia generate`: talk to a trained model, or answer a file of prompts.

Both go through the model's chat template (or `--chat-template`). Chat streams tokens as they come
(transformers' TextStreamer); off a TTY it reads one user turn per stdin line and prints one reply per
turn, so it scripts and tests like a filter. Generate appends one fsynced JSON line per answered prompt,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from transformers import TextStreamer

from losia_cli.errors import ChatError


@dataclass(frozen=True)
class Sampling:
    """Decoding options shared by chat and generate."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8  # generate: prompts per forward pass

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ChatError("--max-new-tokens and --batch-size must be at least 1")
        if not 0 < self.top_p <= 1:
            raise ChatError(f"--top-p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)


def set_chat_template(tokenizer, template: str | None) -> None:
    """Use `template` (a Jinja string, or a file) if given; refuse a model that has none, or a template
    that does not render."""
    import jinja2

    if template and "{{" not in template and "{%" not in template:
        if not Path(template).is_file():
            raise ChatError(f"--chat-template: no such file {template}")
        template = Path(template).read_text()
    if template:
        tokenizer.chat_template = template
    if not tokenizer.chat_template:
        raise ChatError("this model's tokenizer has no chat template; pass --chat-template FILE (Jinja)")
    try:
        render(tokenizer, [{"role": "user", "content": "hi"}])
    except jinja2.TemplateError as e:
        raise ChatError(f"the chat template does not render: {e}") from None


def render(tokenizer, messages: list[dict]) -> str:
    """The prompt text for `messages`, ending where the assistant's reply starts."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class _StreamTo(TextStreamer):
    """TextStreamer that writes to a given stream instead of print()."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text)
        self.out.flush()


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict], sampling: Sampling, out: TextIO | None = None) -> str:
    """The assistant's next turn (streamed to `out` when given)."""
    model.eval()
    enc = tokenizer(render(tokenizer, messages), return_tensors="pt", add_special_tokens=False)
    enc = enc.to(next(model.parameters()).device)
    streamer = _StreamTo(tokenizer, out) if out is not None else None
    generated = model.generate(**enc, streamer=streamer, max_new_tokens=sampling.max_new_tokens,
                               pad_token_id=tokenizer.pad_token_id, **sampling.generate_kwargs())
    return tokenizer.decode(generated[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def chat(model, tokenizer, sampling: Sampling, *, system: str | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None) -> int:
    """The chat loop: `/reset` forgets the conversation (keeps `system`), `/exit` or EOF ends it.
    Returns the number of replies given."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    torch.manual_seed(sampling.seed)
    if interactive:
        stdout.write("chat: /reset starts over, /exit (or Ctrl-D) quits\n")
    replies = 0
    while True:
        if interactive:
            stdout.write("\n> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return replies
        text = line.strip()
        if text == "/reset":
            messages = list(start)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, messages, sampling, out=stdout)
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": answer})
        replies += 1


def read_prompts(path: Path) -> list[dict]:
    """Rows of a prompts JSONL file: {"prompt": str, "id"?: any}. Errors name FILE:LINE."""
    rows, seen = [], set()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ChatError(f"cannot read {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ChatError(f'{path}:{number}: each line needs a "prompt" string, e.g. {{"prompt": "Hi"}}')
        key = json.dumps(row.get("id", row["prompt"]))
        if key in seen:
            raise ChatError(f"{path}:{number}: duplicate {'id' if 'id' in row else 'prompt'} {key}")
        seen.add(key)
        rows.append({**row, "_key": key})
    if not rows:
        raise ChatError(f"{path}: no prompts")
    return rows


def answered(out: Path) -> set[str]:
    """Keys already in `out`. A last line cut off by a crash (no newline) is dropped, to be redone."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(out, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    keys = set()
    for number, line in enumerate(data.decode().splitlines(), 1):
        try:
            row = json.loads(line)
            keys.add(json.dumps(row.get("id", row["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ChatError(f"{out}:{number}: not a losia generate reply line; move the file away "
                            "or pick another --out") from None
    return keys


def _append(out: Path, rows: list[dict]) -> None:
    """One write + fsync per batch: a crash leaves whole lines (and at most a torn last one)."""
    payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_file(model, tokenizer, prompts: Path, out: Path, sampling: Sampling, *, system: str | None = None,
                  console=None) -> tuple[int, int]:
    """Answer every prompt of `prompts` not yet in `out`; returns (answered now, skipped)."""
    from rich.progress import Progress

    from losia_cli.eval.generate import generate

    rows = read_prompts(prompts)
    done = answered(out)
    todo = [row for row in rows if row["_key"] not in done]
    start = [{"role": "system", "content": system}] if system else []
    texts = [render(tokenizer, [*start, {"role": "user", "content": row["prompt"]}]) for row in todo]
    kwargs = sampling.generate_kwargs()
    size = sampling.batch_size
    with Progress(console=console, disable=console is None) as progress:
        bar = progress.add_task("generating", total=len(todo))
        for begin in range(0, len(todo), size):
            batch = todo[begin:begin + size]
            answers = generate(model, tokenizer, texts[begin:begin + size], batch_size=size,
                               max_new_tokens=sampling.max_new_tokens, do_sample=kwargs["do_sample"],
                               temperature=sampling.temperature, top_p=sampling.top_p,
                               seed=sampling.seed + begin)
            _append(out, [{**{k: v for k, v in row.items() if k != "_key"}, "reply": answer.strip()}
                          for row, answer in zip(batch, answers)])
            progress.advance(bar, len(batch))
    return len(todo), len(rows) - len(todo)
