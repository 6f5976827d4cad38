"""`EvalConfig`: the options of `losia eval`, also the `eval:` section of a training recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from losia_cli.errors import UsageError
from losia_cli.schema import Seed, Section

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


class EvalConfig(Section):
    """Options of `losia eval` (also the `eval:` section of a training recipe)."""

    tasks: list[str] = []
    """TASK or TASK@SOURCE (a data source as in `data.source`)."""
    limit: int | None = Field(None, gt=0)
    """First N rows per task."""
    batch_size: int = Field(8, gt=0)
    """Prompts generated together."""
    max_new_tokens: int = Field(256, gt=0)
    """Generation length limit per answer."""
    num_samples: int = Field(1, gt=0)
    """> 1: sample (temperature/top_p) and report pass@k."""
    temperature: float = Field(0.8, gt=0)
    """Sampling temperature when num_samples > 1."""
    top_p: float = Field(0.95, gt=0, le=1)
    """Nucleus sampling mass when num_samples > 1."""
    allow_code_exec: bool | Literal["unsafe"] = False
    """Code tasks run model-written programs: true runs them sandboxed (refused where the sandbox is
    unavailable); unsafe runs them with only time/memory limits, able to reach files and network."""
    chat: bool = False
    """Code tasks: prompt through the chat template, run the reply's code block."""
    timeout_s: float = Field(10.0, gt=0)
    """Seconds one code test may run."""
    forgetting: bool = True
    """General-text loss of the model (and of the baseline) -> delta."""
    general_text: str | None = None
    """Forgetting probe text: a file of paragraphs separated by blank lines (default: the built-in
    ~300-token sample, which resolves only large changes; benchmarks/quality/data/general_text.txt is larger)."""
    after_train: bool = False
    """Run these tasks at the end of `losia train`."""
    seed: Seed = 0
    """Sampling seed."""
    backend: Literal["native", "lm_eval"] = "native"
    """lm_eval: tasks are lm-evaluation-harness task names."""
    include_path: str | None = None
    """lm_eval: a dir of extra harness task YAMLs (local tasks)."""
    num_fewshot: int | None = Field(None, ge=0)
    """lm_eval: few-shot examples (None: each task's default)."""

    def require_work(self) -> None:
        """Refuse a native evaluation with nothing to do (before any model loads)."""
        if self.backend == "native" and not self.tasks and not self.forgetting:
            raise UsageError("nothing to evaluate: give tasks=[...] or forgetting=true")
