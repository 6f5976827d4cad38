"""The generic data formats beyond their fixtures (tests/test_data_tasks.py renders those): alpaca
without `input`, chat templates for tokenizers that have none, sharegpt roles, raw text pieces."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from losia_cli.data import DataConfig, build_dataset, render_samples
from losia_cli.errors import DataError

IGNORE = -100


def targets(tokenizer, sample: dict) -> str:
    """The text that carries loss, turn by turn joined with |."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return "|".join(tokenizer.decode(run) for run in runs + [current] if run)


@pytest.fixture
def bare_tok(smollm2_dir):
    """SmolLM2's tokenizer without a chat template, as a base model's (Llama-2, Gemma-2B) ships."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = None
    return tokenizer


def test_alpaca_input_may_be_missing_or_null(tok, tmp_path):
    row = {"instruction": "Say hi.", "output": "Hi!"}
    files = {"absent.jsonl": row, "null.jsonl": {**row, "input": None}, "empty.jsonl": {**row, "input": ""}}
    built = []
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content) + "\n")
        built.append(build_dataset(DataConfig(task="alpaca", source=str(tmp_path / name)), tok, cache_dir=None)[0])
    assert built[0] == built[1] == built[2]
    assert "### Input" not in tok.decode(built[0]["input_ids"]) and targets(tok, built[0]) == "Hi!<|im_end|>"


def test_chat_needs_a_template_when_the_tokenizer_has_none(bare_tok):
    cfg = DataConfig(task="sharegpt", source="bundled:sharegpt_sample")
    with pytest.raises(DataError, match=r"sharegpt_sample.jsonl:1: .*no chat template; set data.chat_template"):
        build_dataset(cfg, bare_tok, cache_dir=None)


# Row 2 of the sharegpt fixture (system, human, gpt) and row 3 (two exchanges), by template.
RENDERED = {
    "chatml": ("<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
               "<|im_start|>assistant\nAir scatters blue sunlight more than red, so blue reaches us from every direction.<|im_end|>",
               "Spoon.<|im_end|>|Balloon.<|im_end|>"),
    "llama-2": ("<|im_start|>[INST] <<SYS>>\nYou answer in one short sentence.\n<</SYS>>\n\nWhy is the sky blue? [/INST] "
                "Air scatters blue sunlight more than red, so blue reaches us from every direction. <|im_end|>",
                " Spoon. <|im_end|>| Balloon. <|im_end|>"),
    "gemma": ("<|im_start|><start_of_turn>user\nYou answer in one short sentence.\n\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n"
              "Air scatters blue sunlight more than red, so blue reaches us from every direction.<end_of_turn>\n<|im_end|>",
              "Spoon.<end_of_turn>\n|Balloon.<end_of_turn>\n<|im_end|>"),
}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_bundled_chat_templates_mask_every_assistant_turn(name, bare_tok):
    # bare_tok's BOS is <|im_start|> and its EOS <|im_end|>, so they show in the renderings above
    data = build_dataset(DataConfig(task="sharegpt", source="bundled:sharegpt_sample", chat_template=name), bare_tok, cache_dir=None)
    text, turns = RENDERED[name]
    assert bare_tok.decode(data[1]["input_ids"]) == text
    assert targets(bare_tok, data[1]) == text[text.index("Air scatters") - (name == "llama-2"):]
    assert targets(bare_tok, data[2]) == turns


def test_chat_template_from_a_file_and_unknown_names(bare_tok, tmp_path):
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")
    data = build_dataset(DataConfig(task="messages", source="bundled:chat_sample", chat_template=str(jinja)), bare_tok, cache_dir=None)
    assert bare_tok.decode(data[0]["input_ids"]) == "user: What is the capital of Australia?\nassistant: The capital of Australia is Canberra.\n<|im_end|>"
    assert targets(bare_tok, data[0]) == "The capital of Australia is Canberra.\n<|im_end|>"
    with pytest.raises(DataError, match=r"data.chat_template 'chatmI' is neither a bundled template \(chatml, gemma, llama-2\)"):
        build_dataset(DataConfig(task="messages", source="bundled:chat_sample", chat_template="chatmI"), bare_tok, cache_dir=None)


def test_a_template_that_is_not_prefix_stable_is_refused(bare_tok, tmp_path):
    jinja = tmp_path / "count.jinja"  # starts with the number of turns: a longer prefix renders differently
    jinja.write_text("{{ messages | length }} {% for m in messages %}{{ m['content'] }} {% endfor %}")
    cfg = DataConfig(task="messages", source="bundled:chat_sample", chat_template=str(jinja))
    with pytest.raises(DataError, match="chat_sample.jsonl:1: .*does not render conversations prefix by prefix"):
        build_dataset(cfg, bare_tok, cache_dir=None)


def test_sharegpt_unknown_role_names_file_and_line(tok, tmp_path):
    bad = tmp_path / "sg.jsonl"
    turns = [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]
    bad.write_text(json.dumps({"conversations": turns[:1] + [{"from": "gpt", "value": "ok"}]}) + "\n"
                   + json.dumps({"conversations": turns}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:2: .*turn 2 has from 'bot'; expected one of system, human, gpt"):
        build_dataset(DataConfig(task="sharegpt", source=str(bad)), tok, cache_dir=None)


def test_text_documents_are_cut_into_pieces_and_packed_with_eos(tok, tmp_path):
    docs = ["one two three four five six seven eight nine ten eleven twelve", "short doc"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ids = [tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs]
    data = build_dataset(DataConfig(task="text", source=str(path), max_length=8), tok, cache_dir=None)
    pieces = [ids[0][i : i + 8] for i in range(0, len(ids[0]), 8)] + [ids[1]]
    assert [data[i]["input_ids"] for i in range(len(data))] == pieces  # nothing truncated away
    assert all(data[i]["labels"] == [IGNORE] + pieces[i][1:] for i in range(len(data)))
    packed = build_dataset(DataConfig(task="text", source=str(path), max_length=16, packing=True), tok, cache_dir=None)
    flat = [t for i in range(len(packed)) for t in packed[i]["input_ids"]]
    assert sorted(flat) == sorted(t for piece in [ids[0][:16], ids[0][16:], ids[1]] for t in piece)
    assert flat.count(tok.eos_token_id) == 2  # one EOS after each document


def test_render_samples_shows_each_format_with_its_mask(tok):
    for task, source in [("sharegpt", "sharegpt_sample"), ("prompt_completion", "prompt_completion_sample"), ("text", "text_sample")]:
        shown = str(render_samples(DataConfig(task=task, source=f"bundled:{source}"), tok, n=1)[0])
        assert "⟦" in shown and shown.endswith("<|im_end|>⟧")
