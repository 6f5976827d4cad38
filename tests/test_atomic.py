"""losia_cli.atomic: the target is the old or the new content, never a part; written data is fsynced."""

from __future__ import annotations

import os
import stat

import pytest

from losia_cli import atomic
from losia_cli.errors import UsageError


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """What got fsynced: 'file' or 'dir' per call."""
    calls: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def test_file_is_replaced_only_when_the_block_succeeds(tmp_path, fsynced):
    target = tmp_path / "a.json"
    atomic.write_json(target, {"v": 1})
    assert fsynced == ["file", "dir"]  # the content before the rename, the rename after it
    with pytest.raises(RuntimeError), atomic.file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_directory_fsyncs_every_file_then_renames(tmp_path, fsynced):
    with atomic.directory(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"1")
        (tmp / "config.json").write_text("{}")
    assert fsynced == ["file", "dir", "file", "dir", "dir"]  # sub/w.bin, sub/, config.json, tmp/, parent
    with pytest.raises(FileExistsError), atomic.directory(tmp_path / "out") as tmp:
        (tmp / "x").write_text("second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_shared_directory_first_writer_wins(tmp_path):
    """A cache entry built by two processes at once: the second finisher drops its copy quietly."""
    final = tmp_path / "entry"
    assert atomic.temp_path_for(final, private=True) != atomic.temp_path_for(final, private=True)
    with atomic.directory(final, shared=True) as mine:
        (mine / "meta.json").write_text("mine")
        with atomic.directory(final, shared=True) as theirs:  # finishes first
            (theirs / "meta.json").write_text("theirs")
    assert (final / "meta.json").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_only_a_regular_file_is_replaced(tmp_path):
    """`losia bench --out /dev/null` once renamed a file onto the device: a FIFO, a dir or a link
    stands for it here, and each is left as it was."""
    fifo, folder, link = tmp_path / "fifo", tmp_path / "dir", tmp_path / "link"
    os.mkfifo(fifo)
    folder.mkdir()
    (tmp_path / "target").write_text("kept")
    link.symlink_to(tmp_path / "target")
    for path in (fifo, folder, link):
        with pytest.raises(UsageError, match="not a regular file"):
            atomic.write_json(path, {"x": 1})
    assert stat.S_ISFIFO(fifo.stat().st_mode) and folder.is_dir() and link.is_symlink()
    assert (tmp_path / "target").read_text() == "kept"
    atomic.write_json(tmp_path / "new.json", {"x": 1})  # a new file, and a regular one, are written
    atomic.write_json(tmp_path / "new.json", {"x": 2})
