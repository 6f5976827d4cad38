"""`losia chat` and `losia generate`: turns off a TTY, /reset and /exit, resumable batched replies."""

from __future__ import annotations

import io
import json

import pytest

from losia_cli import chat as chat_module
from losia_cli.chat import Sampling, chat, set_chat_template
from losia_cli.errors import ChatError
from losia_cli.cli import main


def test_chat_turns_reset_and_exit(monkeypatch, tok):
    seen = []

    def fake_reply(model, tokenizer, messages, sampling, out=None):
        seen.append([m["content"] for m in messages])
        out.write(f"reply{len(seen)}")
        return f"reply{len(seen)}"

    monkeypatch.setattr(chat_module, "reply", fake_reply)
    stdin, stdout = io.StringIO("hi\n\nagain\n/reset\nfresh\n/exit\nnever read\n"), io.StringIO()
    assert chat(None, tok, Sampling(), system="be brief", stdin=stdin, stdout=stdout) == 3
    # History grows with each turn; /reset drops it but keeps the system prompt; /exit stops reading.
    assert seen == [["be brief", "hi"], ["be brief", "hi", "reply1", "again"], ["be brief", "fresh"]]
    assert stdout.getvalue().splitlines() == ["reply1", "reply2", "reply3"]


def test_chat_on_a_tiny_model_from_stdin(monkeypatch, capsys, tiny_llama_dir):
    real, answers = chat_module.reply, []
    monkeypatch.setattr(chat_module, "reply", lambda *a, **k: answers.append(real(*a, **k)) or answers[-1])
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 7*8?\n"))
    assert main(["chat", str(tiny_llama_dir), "--max-new-tokens", "4", "--system", "Answer."]) == 0
    out = capsys.readouterr().out
    # One turn in, one reply out: the streamed text is the reply (random weights: any 4 tokens).
    assert len(answers) == 1 and out.endswith("\n") and out.strip() == answers[0]


def test_chat_on_a_lora_run_dir(monkeypatch, capsys, tiny_config):
    from losia_cli.workflow import train

    run_dir = train(tiny_config("chat", "method=lora", "train.max_steps=1"))
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 7*8?\n/exit\n"))
    assert main(["chat", str(run_dir), "--max-new-tokens", "3"]) == 0  # the adapter is folded in memory
    assert capsys.readouterr().out.endswith("\n")


def test_chat_template_missing_or_given(tok, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    bare = type(tok).from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(ChatError, match="--chat-template"):
        set_chat_template(bare, None)
    set_chat_template(bare, str(template))
    assert chat_module.render(bare, [{"role": "user", "content": "hi"}]) == "hi|"
    with pytest.raises(ChatError, match="no such file"):
        set_chat_template(bare, str(tmp_path / "missing.jinja"))
    with pytest.raises(ChatError, match="does not render"):
        set_chat_template(bare, "{% for m in messages %}")


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_batches_and_resumes(capsys, tiny_llama_dir, tmp_path):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out" / "replies.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"Count to {i}."}) + "\n" for i in range(3)))
    argv = ["generate", str(tiny_llama_dir), str(prompts), "--out", str(out), "--max-new-tokens", "3",
            "--batch-size", "2"]
    assert main(argv) == 0
    first = _rows(out)
    assert [r["id"] for r in first] == [0, 1, 2] and all(isinstance(r["reply"], str) for r in first)
    # A crash mid-append leaves a torn last line; new prompts arrive; the rerun answers only what is missing.
    out.write_bytes(out.read_bytes() + b'{"id": 2, "pro')
    with prompts.open("a") as handle:
        handle.write(json.dumps({"prompt": "No id here."}) + "\n")
    assert main(argv) == 0
    assert _rows(out) == first + [{"prompt": "No id here.", "reply": _rows(out)[-1]["reply"]}]
    assert "1 replies (3 already answered)" in capsys.readouterr().out


@pytest.mark.parametrize("line, message", [
    ("{not json", "prompts.jsonl:2: not valid JSON"),
    ('{"text": "hi"}', 'prompts.jsonl:2: each line needs a "prompt"'),
    ('{"prompt": "hi"}', "prompts.jsonl:2: duplicate prompt"),
])
def test_generate_bad_rows_name_file_and_line(capsys, tmp_path, line, message):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "replies.jsonl"
    prompts.write_text('{"prompt": "hi"}\n' + line + "\n")
    assert main(["generate", "no/such/model", str(prompts), "--out", str(out)]) == 2  # before any load
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--top-p", "0"], ["--max-new-tokens", "0"]])
def test_generate_bad_options(capsys, tmp_path, option):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    assert main(["generate", "no/such/model", str(prompts), "--out", str(tmp_path / "r.jsonl"), *option]) == 2
    assert option[0] in capsys.readouterr().err


@pytest.mark.slow
def test_chat_packaged_smollm2(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 7*8?\n"))
    assert main(["chat", "package:smollm2-135m", "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out.strip()
