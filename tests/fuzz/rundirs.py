"""A finished run dir with one thing damaged, and the commands that read run dirs.

The run is copied with hard links (cheap: the weights are not copied) and a damaged file is always
replaced, never written in place, so the pristine run the links share stays as it was; the harness
checks that (and that the command changed nothing in its copy) by inode, size and mtime.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hypothesis import strategies as st

DAMAGES = ("truncate", "empty", "garble", "not-utf8", "delete", "dir", "dangling-link", "link-to-dev-zero", "fifo")


def copy_run(pristine: Path, dest: Path, writable: bool = False) -> Path:
    """A copy of the run: weights and optimizer state hard-linked; with `writable` (a resume appends to
    its records in place) every other file copied."""
    def link(src, dst):
        return os.link(src, dst) if not writable or src.endswith((".safetensors", ".pt", ".bin")) else shutil.copy2(src, dst)

    shutil.copytree(pristine, dest, copy_function=link, symlinks=True)
    return dest


def paths_of(run: Path) -> list[str]:
    """Every file and folder of a run dir, relative, in a fixed order (what a damage may hit)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name != ".lock")


def _replace(path: Path, data: bytes | None = None) -> None:
    """Unlink `path` (file or folder), then write `data` there if given: the hard-linked original stays."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if data is not None:
        path.write_bytes(data)


@st.composite
def damage(draw, run: Path) -> tuple[str, str, object]:
    """(path in the run, damage, its parameter) for damage_run."""
    rel = draw(st.sampled_from(paths_of(run)))
    kind = draw(st.sampled_from(DAMAGES))
    if (run / rel).is_dir() and kind in ("truncate", "garble", "not-utf8"):
        kind = "empty"  # a folder: emptied of its files
    size = (run / rel).stat().st_size if (run / rel).is_file() else 0
    param = {"truncate": draw(st.integers(0, max(size - 1, 0))),
             "garble": draw(st.lists(st.integers(0, max(size - 1, 0)), min_size=1, max_size=8)),
             "not-utf8": draw(st.integers(0, size))}.get(kind)
    return rel, kind, param


def apply(run: Path, rel: str, kind: str, param) -> None:
    path = run / rel
    if kind == "none":
        return
    if kind == "empty" and path.is_dir():
        shutil.rmtree(path)
        path.mkdir()
        return
    data = path.read_bytes() if path.is_file() else b""
    if kind == "truncate":
        _replace(path, data[:param])
    elif kind == "empty":
        _replace(path, b"")
    elif kind == "garble":
        garbled = bytearray(data)
        for at in param if garbled else ():
            garbled[at] ^= 0xA5
        _replace(path, bytes(garbled))
    elif kind == "not-utf8":
        _replace(path, data[:param] + b"\xff\xfe" + data[param:])
    elif kind == "delete":
        _replace(path)
    elif kind == "dir":
        _replace(path)
        path.mkdir()
    elif kind == "dangling-link":
        _replace(path)
        path.symlink_to(path.with_name("fuzz-nowhere"))
    elif kind == "link-to-dev-zero":
        _replace(path)
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        _replace(path)
        os.mkfifo(path)


def commands(run: Path, out: Path, train_overrides: list[str]) -> dict[str, tuple[list[str], str]]:
    """command name -> (argv, stdin) of each command that reads a run dir; writes only under `out`."""
    return {
        "merge": (["merge", run, "--out", out / "merged"], ""),
        "report": (["report", run, "--out", out / "report"], ""),
        "eval": (["eval", run, "tasks=[gsm8k@bundled:gsm8k_sample]", "limit=1", "max_new_tokens=2",
                  "forgetting=false", "--out", out / "eval"], ""),
        "export": (["export", run, "--format", "gguf", "--out", out / "model.gguf"], ""),
        "chat": (["chat", run, "--max-new-tokens", "2"], "hi\n"),
        "resume": (["train", *train_overrides, f"run.output_dir={run.parent}", f"run.name={run.name}",
                    "run.resume=auto"], ""),
    }


# The run-dir cases issue #22 reported: (command, damage, index into OUTS or None).
ISSUE_CASES = [
    *((command, ("config.yaml", kind, param), None) for command in ("merge", "report", "eval", "export", "chat")
      for kind, param in (("truncate", 40), ("not-utf8", 10))),
    *((command, ("final/config.json", "empty", None), None) for command in ("merge", "eval", "export", "chat")),
    ("merge", ("config.yaml", "none", None), 0),  # merge RUN --out . --force
    ("resume", ("checkpoints", "delete", None), None),  # resume=auto with no checkpoint left
    # found by the long run (`make fuzz FUZZ_CASES=2000`)
    ("merge", ("report.json", "link-to-dev-zero", None), None),  # the model card read it without end
    ("resume", ("checkpoints/step-1", "empty", None), None),  # an emptied checkpoint without a manifest
    ("resume", ("config.yaml", "link-to-dev-zero", None), None),  # metrics.jsonl cut before the refusal
    ("export", ("checkpoints", "dangling-link", None), 0),  # export --out . --force: named neither
    ("export", ("checkpoints", "dangling-link", None), 3),  # export --out RUN/config.yaml: wrote into RUN
]

# --out values that point back into the input, or at the working dir: the run must stay as it was.
OUTS = {
    "merge": [".", "{run}", "{run}/final", "{run}/config.yaml"],
    "report": [".", "{run}", "{run}/final"],
    "export": [".", "{run}", "{run}/final/model.safetensors", "{run}/config.yaml"],
}
