"""The default evaluation set of each task whose benchmark is public (its options, `EvalConfig`, are a
section of the run schema in losia_cli/schema.py). Torch-free: `losia eval --help` lists these."""

from __future__ import annotations

# Default evaluation split of each task whose standard benchmark is public on the hub.
# Anything else: give the source explicitly as TASK@SOURCE (e.g. boolq@bundled:boolq_sample).
DEFAULT_SOURCES = {
    "humaneval": ("package:humaneval", None, "test"),
    "gsm8k": ("hub:openai/gsm8k", "main", "test"),
    "mbpp": ("hub:google-research-datasets/mbpp", "full", "test"),
    "boolq": ("hub:google/boolq", None, "validation"),
    "arc_e": ("hub:allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_c": ("hub:allenai/ai2_arc", "ARC-Challenge", "test"),
}
