"""Bad input: one-line DataError naming the file/line/column/key, and nothing left in the cache."""

from __future__ import annotations

import json
import shutil

import pytest

from losia_cli.data import DataConfig, build_dataset, get_task
from losia_cli.errors import DataError
from losia_cli.data.sources import samples_dir
from losia_cli.resources import templates_dir

GOOD = {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def fails(tok, tmp_path, match: str, **fields) -> str:
    cache = tmp_path / "cache"
    cfg = DataConfig(**{"task": "gsm8k", **fields})
    with pytest.raises(DataError, match=match) as info:
        build_dataset(cfg, tok, cache_dir=cache)
    message = str(info.value)
    assert "\n" not in message
    assert not cache.exists() or not any(cache.iterdir())  # nothing cached, no temp left behind
    return message


def test_missing_file(tok, tmp_path):
    missing = tmp_path / "nope.jsonl"
    fails(tok, tmp_path, f"{missing}: no such file", source=str(missing))


def test_empty_files(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    fails(tok, tmp_path, "empty.jsonl: empty file", source=str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    fails(tok, tmp_path, "blank.jsonl: no rows", source=str(tmp_path / "blank.jsonl"))
    (tmp_path / "empty.json").write_text("[]")
    fails(tok, tmp_path, "empty.json: no rows", source=str(tmp_path / "empty.json"))


def test_malformed_jsonl_line_names_file_and_line(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl(GOOD, GOOD, '{"question": "oops", "answer": }', GOOD))
    message = fails(tok, tmp_path, "malformed JSON line", source=str(bad))
    assert message.startswith(f"{bad}:3: ") and "column 32" in message
    bad.write_text(jsonl(GOOD, "[1, 2]"))
    fails(tok, tmp_path, rf"{bad}:2: expected a JSON object, got a list", source=str(bad))


def test_malformed_json_array_names_line_and_column(tok, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"question": "a", "answer": "b"},\n  {"question": "c" "answer": "d"}\n]\n')
    fails(tok, tmp_path, rf"{bad}:3:20: malformed JSON", source=str(bad))


def test_missing_column_is_named_with_the_columns_found(tok, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(jsonl({"problem": "What is 2 + 3?", "answer": "5"}))
    message = fails(tok, tmp_path, "column 'question' used by template", source=str(data))
    assert str(data) in message and "gsm8k.yaml" in message and "columns found: problem, answer" in message


def test_column_map_key_that_is_not_a_column(tok, tmp_path):
    fails(tok, tmp_path, "data.column_map renames column 'query', which is not there; columns found: question, answer",
          source="bundled:gsm8k_sample", column_map={"query": "question"})


def test_template_referencing_an_unknown_field(tok, tmp_path):
    template = tmp_path / "mine.yaml"
    shutil.copy(templates_dir() / "gsm8k.yaml", template)
    template.write_text(template.read_text().replace("{{ question }}", "{{ questoin }}"))
    message = fails(tok, tmp_path, "column 'questoin' used by template", source="bundled:gsm8k_sample", template=str(template))
    assert str(template) in message and "columns found: question, answer" in message


def test_template_syntax_error_names_the_file(tok, tmp_path):
    template = tmp_path / "broken.yaml"
    shutil.copy(templates_dir() / "gsm8k.yaml", template)
    template.write_text(template.read_text().replace("{{ question }}", "{{ question }"))
    fails(tok, tmp_path, f"{template}: template 'prompt' line 1", source="bundled:gsm8k_sample", template=str(template))


def test_unknown_task_lists_the_known_ones(tok, tmp_path):
    message = fails(tok, tmp_path, "unknown task 'gsm9k'; known tasks: ", task="gsm9k", source="bundled:gsm8k_sample")
    assert "gsm8k" in message and "metamathqa" in message and "chat" in message


def test_unknown_bundled_and_packaged_names(tok, tmp_path):
    fails(tok, tmp_path, "unknown bundled data 'gsm9k_sample'; bundled: .*gsm8k_sample", source="bundled:gsm9k_sample")
    fails(tok, tmp_path, "unknown packaged data 'package:mbpp'; known: package:humaneval", source="package:mbpp")


def test_bad_row_values_are_reported_by_file_and_line(tok, tmp_path):
    rows = tmp_path / "arc.jsonl"
    good = {"question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}
    rows.write_text(jsonl(good) + "\n" + jsonl(dict(good, answerKey="E")))  # a blank line: row 2 is line 3
    fails(tok, tmp_path, rf"{rows}:3: task arc_e \(arc.yaml\): cannot render row: 'E' is not in list",
          task="arc_e", source=str(rows))
    fails(tok, tmp_path, rf"{rows}:3: ", task="arc_e", source=str(rows), num_workers=2)  # raised in a worker
    # a subset (max_samples, val_split) still names the row's own line
    rows.write_text(jsonl(*[good] * 6, dict(good, answerKey="E"), good))
    fails(tok, tmp_path, rf"{rows}:7: ", task="arc_e", source=str(rows), max_samples=7, shuffle_seed=1)
    fails(tok, tmp_path, rf"{rows}:7: ", task="arc_e", source=str(rows), val_split=0.25)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(jsonl({"messages": [{"role": "user", "content": "hi"}]}))
    fails(tok, tmp_path, f"{chat}:1: .*the last turn must be the assistant's", task="chat", source=str(chat))


def test_unsupported_file_type_and_non_dataset_folder(tok, tmp_path):
    (tmp_path / "rows.txt").write_text("hello")
    fails(tok, tmp_path, "rows.txt: unsupported file type", source=str(tmp_path / "rows.txt"))
    folder = tmp_path / "folder"
    folder.mkdir()
    fails(tok, tmp_path, "a folder source must be a datasets `save_to_disk` folder", source=str(folder))


def test_every_sample_overlong(tok, tmp_path):
    fails(tok, tmp_path, "every sample is longer than max_length=8", source="bundled:gsm8k_sample", max_length=8, overlong="drop")


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="max_len"):
        DataConfig(task="gsm8k", source="bundled:gsm8k_sample", max_len=128)


def test_bundled_fixtures_are_all_used():
    used = {get_task(name).spec.sample for name in ("gsm8k", "metamathqa", "math", "magicoder", "codealpaca", "mbpp",
                                                     "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e",
                                                     "obqa", "commonsense170k", "alpaca", "chat", "sharegpt",
                                                     "prompt_completion", "text", "preference",
                                                     "preference_messages")}
    assert used == {p.name for p in samples_dir().iterdir()}


# -- text encodings (issue 16): never train on b'...' text, never print a raw NUL ----------------
CSV = 'question,answer\n"What is 2 + 3?","2 + 3 = 5\n#### 5"\n"Café au lait costs 3 euros; two cost?","3 * 2 = 6\n#### 6"\n'


def test_latin1_csv_is_refused_by_line_or_read_with_data_encoding(tok, tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes(CSV.encode("latin-1"))
    message = fails(tok, tmp_path, rf"{latin}:4: not valid utf-8 text \(byte 0xe9 at column 5\); set data.encoding",
                    source=str(latin))
    assert "b'" not in message
    data = build_dataset(DataConfig(task="gsm8k", source=str(latin), encoding="latin-1"), tok, cache_dir=None)
    assert "Café au lait" in tok.decode(data[1]["input_ids"])


def test_utf16_csv_names_the_encoding_without_printing_nul(tok, tmp_path):
    wide = tmp_path / "wide.csv"
    wide.write_bytes(CSV.encode("utf-16"))
    message = fails(tok, tmp_path, rf"{wide}:1: NUL bytes: the file looks like UTF-16", source=str(wide))
    assert "\0" not in message
    data = build_dataset(DataConfig(task="gsm8k", source=str(wide), encoding="utf-16"), tok, cache_dir=None)
    assert "Café au lait" in tok.decode(data[1]["input_ids"])


def test_non_utf8_jsonl_names_the_line_not_a_byte_offset(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(GOOD, GOOD).encode() + '{"question": "Crème?", "answer": "#### 1"}\n'.encode("latin-1"))
    message = fails(tok, tmp_path, rf"{bad}:3: not valid utf-8 text \(byte 0xe8 at column 17\)", source=str(bad))
    assert "position" not in message


def test_byte_columns_are_refused(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"question": pa.array([b"Caf\xe9?"], pa.binary()), "answer": ["#### 1"]}), path)
    fails(tok, tmp_path, rf"{path}: column 'question' holds raw bytes, not text", source=str(path))


def test_unknown_encoding_is_a_config_error():
    with pytest.raises(ValueError, match="unknown text encoding 'latin-9000'"):
        DataConfig(task="gsm8k", source="bundled:gsm8k_sample", encoding="latin-9000")
    with pytest.raises(ValueError, match="unknown text encoding"):
        DataConfig(task="gsm8k", sources=[{"source": "bundled:gsm8k_sample", "encoding": "nope"}]).components()


def test_a_mixture_source_left_without_samples_is_named(tok, tmp_path):
    fails(tok, tmp_path, "bundled:gsm8k_sample: every sample is longer than max_length=24",
          sources=[{"source": "bundled:prompt_completion_sample", "task": "prompt_completion"},
                   {"source": "bundled:gsm8k_sample"}], max_length=24, overlong="drop")


@pytest.mark.parametrize("task, good, column", [
    ("gsm8k", GOOD, "answer"),
    ("alpaca", {"instruction": "i", "input": "", "output": "o"}, "output"),
    ("prompt_completion", {"prompt": "p ", "completion": "c"}, "completion"),
    ("text", {"text": "a document"}, "text"),
])
def test_null_or_missing_column_is_named_by_file_and_line(tok, tmp_path, task, good, column):
    """A null, or a column a later row lacks (read as null), would render as the text `None`."""
    data = tmp_path / "rows.jsonl"
    data.write_text(jsonl(good, {**good, column: None}))
    assert fails(tok, tmp_path, "is missing", task=task, source=str(data)) == \
        f"{data}:2: column {column!r} is missing or null"
    data.write_text(jsonl(good, good, {k: v for k, v in good.items() if k != column}))
    fails(tok, tmp_path, rf"{data}:3: column {column!r} is missing or null", task=task, source=str(data))
    data.write_text(jsonl({**good, column: 5}))  # a number in every row (else datasets refuses the mix)
    fails(tok, tmp_path, rf"{data}:1: column {column!r} is not text: int '5'", task=task, source=str(data))


def test_alpaca_input_may_still_be_null_or_absent(tok, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(jsonl({"instruction": "i", "output": "o"}, {"instruction": "i", "input": None, "output": "o"}))
    assert build_dataset(DataConfig(task="alpaca", source=str(data)), tok, cache_dir=None).stats["n_rows"] == 2


def test_parquet_null_and_int_columns_are_named_by_row(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"question": ["q", "q"], "answer": ["a", None]}), data)
    fails(tok, tmp_path, rf"{data} row 2: column 'answer' is missing or null", source=str(data))
    pq.write_table(pa.table({"question": ["q", "q"], "answer": [1, 2]}), data)
    fails(tok, tmp_path, rf"{data} row 1: column 'answer' is not text", source=str(data))


def test_a_template_printing_a_non_string_is_refused(tok, tmp_path):
    template = tmp_path / "t.yaml"
    template.write_text(yaml_template := 'family: x\nkind: generate\ndescription: d\nprompt: "{{ question }}"\n'
                        'response: " {{ answer | length }}"\nreference: "answer"\n')
    assert "length" in yaml_template
    data = tmp_path / "rows.jsonl"
    data.write_text(jsonl(GOOD))
    fails(tok, tmp_path, rf"{data}:1: .*the template prints a int", source=str(data), template=str(template))


def test_deeply_nested_json_is_one_line(tok, tmp_path):
    data = tmp_path / "deep.jsonl"
    data.write_text(jsonl(GOOD, "[" * 100_000))
    fails(tok, tmp_path, rf"{data}:2: JSON nested too deeply", source=str(data))
    array = tmp_path / "deep.json"
    array.write_text("[" * 100_000)
    fails(tok, tmp_path, rf"{array}: JSON nested too deeply", source=str(array))
    data.write_text(jsonl({**GOOD, "x": json.loads("[" * 900 + "]" * 900)}))  # parses, too deep for datasets
    fails(tok, tmp_path, rf"{data}: cannot read .jsonl file: maximum recursion depth", source=str(data))


def test_special_files_are_refused_naming_the_key(tok, tmp_path):
    """Reading a FIFO or /dev/zero would never end."""
    import os

    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    fails(tok, tmp_path, rf"{fifo}: not a regular file or folder \(data.source\)", source=str(fifo))
    fails(tok, tmp_path, r"/dev/zero: not a regular file or folder \(data.source\)", source="/dev/zero")
    folder = tmp_path / "folder"
    folder.mkdir()
    os.mkfifo(folder / "data-00000-of-00001.arrow")
    fails(tok, tmp_path, rf"{folder}/data-00000-of-00001.arrow: not a regular file", source=str(folder))
    fails(tok, tmp_path, rf"{fifo}: not a regular file \(data.template\)", source="bundled:gsm8k_sample",
          template=str(fifo))
    with pytest.raises(DataError, match=r"^/dev/zero: not a regular file or folder \(data.val_source\)$"):
        build_dataset(DataConfig(task="gsm8k", source="bundled:gsm8k_sample", val_source="/dev/zero"), tok,
                      cache_dir=None, split="val")


def test_val_and_mixture_sources_are_named_by_their_own_key(tok, tmp_path):
    with pytest.raises(DataError, match=r"^a b c: no such file or directory \(data.val_source\)$"):
        build_dataset(DataConfig(task="gsm8k", source="bundled:gsm8k_sample", val_source="a b c"), tok,
                      cache_dir=None, split="val")
    fails(tok, tmp_path, r"/no/such.jsonl: no such file or directory \(data.sources.1.source\)",
          sources=[{"source": "bundled:gsm8k_sample"}, {"source": "/no/such.jsonl"}])


def test_names_too_long_for_a_path_name_the_key(tok, tmp_path):
    fails(tok, tmp_path, r"^data.source: File name too long$", source="x" * 20_000)
    fails(tok, tmp_path, r"^data.chat_template: File name too long", source="bundled:gsm8k_sample",
          chat_template="x" * 20_000)
