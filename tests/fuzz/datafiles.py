"""Data files per format, good or broken, and what `losia recipes validate` must make of each.

A case is rows of one task (gsm8k, alpaca, prompt_completion, text, sharegpt, messages), maybe with
one cell made bad (null, a number, a list, deep nesting, a missing column, a broken conversation),
written as JSON Lines, a JSON array, Parquet or CSV, then maybe damaged as bytes (truncated, a byte
that is not UTF-8, a NUL, UTF-16, a line of 100,000 `[`, a huge value). Rows and bytes that are
certainly bad must exit 2 naming the file; clean JSON/JSONL/Parquet rows must exit 0.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from fuzz.harness import ANY, INVALID, VALID

# task -> (the recipes/data group that uses it, required text columns, optional text columns)
FLAT = {
    "gsm8k": ("gsm8k_sample", ("question", "answer"), ()),
    "alpaca": ("alpaca_sample", ("instruction", "output"), ("input",)),  # input: "empty, null or absent"
    "prompt_completion": ("prompt_completion_sample", ("prompt", "completion"), ()),
    "text": ("text_sample", ("text",), ()),
}
# task -> (group, conversation column, role key, content key, user role, assistant role)
CHAT = {
    "sharegpt": ("sharegpt_sample", "conversations", "from", "value", "human", "gpt"),
    "messages": ("messages_sample", "messages", "role", "content", "user", "assistant"),
}
TASKS = sorted(FLAT) + sorted(CHAT)
FORMATS = ("jsonl", "json", "parquet", "csv")

_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=60)


@dataclass
class DataCase:
    task: str
    fmt: str
    data: bytes
    expect: str
    what: str  # how it was made, for the repro line


def group(task: str) -> str:
    return (FLAT.get(task) or CHAT[task])[0]


def _bad_cell(draw):
    """A value no text column takes."""
    return draw(st.sampled_from([None, 7, 2.5, True, ["a", "b"], {"a": "b"}, "DEEP"]))


def _deep(depth: int):
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def rows_for(draw, task: str) -> tuple[list[dict], str]:
    """1-5 good rows of `task`, maybe one of them made certainly bad; (rows, what was made bad or "")."""
    n = draw(st.integers(1, 5))
    if task in FLAT:
        _, required, optional = FLAT[task]
        rows = [{c: draw(_TEXT) for c in required} for _ in range(n)]
        for row in rows:
            for c in optional:
                choice = draw(st.sampled_from(["text", "null", "absent"]))
                if choice != "absent":
                    row[c] = draw(_TEXT) if choice == "text" else None
            if draw(st.booleans()):
                row["extra"] = draw(_TEXT)  # a column no template uses: fine
    else:
        _, column, role, content, user, assistant = CHAT[task]
        rows = [{column: [{role: user, content: draw(_TEXT)}, {role: assistant, content: draw(_TEXT)}]}
                for _ in range(n)]
    if not draw(st.booleans()):
        return rows, ""
    i = draw(st.integers(0, n - 1))  # often a later row: a column missing on row 3 must be named too
    if task in FLAT:
        c = draw(st.sampled_from(FLAT[task][1]))
        bad = _bad_cell(draw)
        if draw(st.booleans()):
            del rows[i][c]
            return rows, f"row {i + 1} lacks {c}"
        value = _deep(draw(st.integers(2, 900))) if bad == "DEEP" else bad
        kind = "deep list" if bad == "DEEP" else type(bad).__name__
        if draw(st.booleans()):  # the whole column: one type, so the rows still share an Arrow schema
            for row in rows:
                row[c] = value
            return rows, f"every {c}={kind}"
        rows[i][c] = value
        return rows, f"row {i + 1} {c}={kind}"
    turns = rows[i][column]
    damage = draw(st.sampled_from(["null", "empty", "text", "role", "content", "last", "keyless"]))
    rows[i][column] = {
        "null": None, "empty": [], "text": "hello",
        "role": [{**turns[0], role: "fuzz_role"}, turns[1]],
        "content": [turns[0], {**turns[1], content: draw(st.sampled_from([None, 7, ["a"]]))}],
        "last": turns[:1],  # no assistant turn to train on
        "keyless": [{content: turns[0][content]}, turns[1]],
    }[damage]
    return rows, f"row {i + 1} conversation {damage}"


def serialize(rows: list[dict], fmt: str) -> bytes | None:
    """The rows as a file of `fmt`; None where the format cannot hold them (CSV: nested values)."""
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows).encode()
    if fmt == "json":
        return json.dumps(rows, indent=1).encode()
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowException, TypeError, ValueError, RecursionError):  # mixed types in one column: not a Parquet file
            return None
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        return buffer.getvalue()
    if any(isinstance(v, (list, dict)) for row in rows for v in row.values()):
        return None
    columns = list(dict.fromkeys(c for row in rows for c in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


CORRUPTIONS = ("none", "none", "truncate", "not-utf8", "nul", "utf16", "deep-line", "huge-value", "blank")


def _parses(data: bytes, fmt: str) -> bool:
    """Whether a JSON/JSONL file still holds only objects, as losia reads them."""
    try:
        text = data.decode("utf-8")
        if fmt == "json" or text.lstrip().startswith("["):
            rows = json.loads(text)
            return isinstance(rows, list) and bool(rows) and all(isinstance(r, dict) for r in rows)
        rows = [json.loads(line) for line in text.split("\n") if line.strip()]
        return bool(rows) and all(isinstance(r, dict) for r in rows)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


@st.composite
def data_cases(draw) -> DataCase:
    task = draw(st.sampled_from(TASKS))
    rows, bad_row = draw(rows_for(task))
    fmt = draw(st.sampled_from(FORMATS))
    data = serialize(rows, fmt)
    if data is None:
        fmt, data = "jsonl", serialize(rows, "jsonl")
    corruption = "none" if bad_row else draw(st.sampled_from(CORRUPTIONS))  # one fault per case
    text_format = fmt != "parquet"
    # What the rows alone make of it: CSV cannot tell a missing cell from an empty one, nor a number
    # from text, so only a column missing from every row is certainly bad there.
    if fmt == "csv":
        header = data.split(b"\n", 1)[0].decode().split(",")
        expect = INVALID if task in FLAT and not set(FLAT[task][1]) <= set(header) else ANY
    else:
        expect = INVALID if bad_row else VALID
    if corruption == "truncate" and len(data) > 1:
        data = data[: draw(st.integers(0, len(data) - 1))]
        if fmt == "parquet" or not data.strip() or (fmt in ("json", "jsonl") and not _parses(data, fmt)):
            expect = INVALID
        elif expect == VALID:
            expect = ANY  # a cut at a line's end leaves fewer, good rows; a cut value is still text
    elif corruption in ("not-utf8", "nul") and text_format:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + (b"\xff" if corruption == "not-utf8" else b"\0") + data[at:]
        expect = INVALID
    elif corruption == "utf16" and text_format:
        data = data.decode().encode("utf-16")
        expect = INVALID
    elif corruption == "deep-line" and fmt == "jsonl":
        data += b"[" * draw(st.sampled_from([1000, 5000, 100_000])) + b"\n"
        expect = INVALID
    elif corruption == "huge-value" and fmt == "jsonl" and task in FLAT and not bad_row:
        column = FLAT[task][1][-1]
        huge = {**rows[0], column: "x " * draw(st.integers(50_000, 500_000))}
        data = json.dumps(huge).encode() + b"\n" + data
    elif corruption == "blank":
        data = b" \n\n  \n"
        expect = INVALID
    else:
        corruption = "none"
    what = f"{task} {fmt}" + (f", {bad_row}" if bad_row else "") + (f", {corruption}" if corruption != "none" else "")
    return DataCase(task, fmt, data, expect, what)


def write(case: DataCase, folder: Path) -> Path:
    path = folder / f"rows.{case.fmt}"
    path.write_bytes(case.data)
    return path


# Paths that are not regular files, each certainly not a data source: (name, how to make it in a
# folder, returning the path to pass). /dev/zero and FIFOs are the hangs of issue #22.
def _fifo(folder: Path) -> Path:
    os.mkfifo(folder / "rows.jsonl")
    return folder / "rows.jsonl"


def _link(target: str, name: str = "rows.jsonl"):
    def make(folder: Path) -> Path:
        (folder / name).symlink_to(target)
        return folder / name
    return make


def _dir(with_file: bool):
    def make(folder: Path) -> Path:
        (folder / "rows.jsonl").mkdir()
        if with_file:
            (folder / "rows.jsonl" / "part.jsonl").write_text('{"a": "b"}\n')
        return folder / "rows.jsonl"
    return make


SPECIAL = {
    "fifo": _fifo,
    "dev-zero": lambda folder: Path("/dev/zero"),
    "dev-urandom": lambda folder: Path("/dev/urandom"),
    "dev-null": lambda folder: Path("/dev/null"),
    "link-to-dev-zero": _link("/dev/zero"),
    "link-to-dev-urandom": _link("/dev/urandom"),
    "empty-dir": _dir(False),
    "dir-of-files": _dir(True),
    "dangling-link": _link("nowhere.jsonl"),
    "link-loop": _link("rows.jsonl"),
}
