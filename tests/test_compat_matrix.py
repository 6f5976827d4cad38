"""The compatibility matrix (benchmarks/compat/matrix.py) over every family it knows, for LoSiA-Pro
and LoRA: train -> resume -> merge (verified) -> chat -> eval, each ok (tiny models, 2 steps)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compat" / "matrix.py"
spec = importlib.util.spec_from_file_location("compat_matrix", SCRIPT)
matrix = sys.modules["compat_matrix"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(matrix)


@pytest.mark.parametrize("family", list(matrix.FAMILIES))
def test_family_trains_resumes_merges_chats_and_evaluates(family, smollm2_dir, tmp_path):
    rows = matrix.run_family(family, ["losia_pro", "lora"], tmp_path, smollm2_dir)
    assert {row.method: row.cells for row in rows} == {
        method: dict.fromkeys(matrix.STAGES, "ok") for method in ("losia_pro", "lora")
    }
    assert all(row.targets for row in rows)
