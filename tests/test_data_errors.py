"""Bad input: one-line DataError naming the file/line/column/key, and nothing left in the cache."""

from __future__ import annotations

import json
import shutil

import pytest

from losia_cli.data import DataConfig, DataError, build_dataset, get_task
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
                                                     "prompt_completion", "text")}
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
