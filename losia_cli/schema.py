"""What every section of the run schema shares (config.py, data/config.py, `EvalConfig` below): unknown
keys refused, floats finite, strings non-empty, and a boolean never taken for a number (pydantic's
lax mode reads `seed=true` as 1). `EvalConfig` sits here, torch-free, for `losia eval --help`. A field that allows NaN/inf says so with `Field(allow_inf_nan=True)`."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from losia_cli.errors import UsageError

# Method configs are plain dataclasses (methods/base.py) and take the same rules as a config dict.
RULES = {"extra": "forbid", "use_attribute_docstrings": True, "allow_inf_nan": False, "str_min_length": 1}

# numpy's legacy seeding (lm-eval's numpy_random_seed) takes at most 32 bits.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


def accepts_bool(annotation) -> bool:
    """Whether a field's type takes true/false (`bool`, `bool | None`, `bool | Literal[...]`)."""
    return annotation is bool or any(accepts_bool(arg) for arg in get_args(annotation))


def refuse_bool(value, annotation):
    if isinstance(value, bool) and not accepts_bool(annotation):
        raise ValueError("takes no true/false")
    return value


class Section(BaseModel):
    model_config = ConfigDict(**RULES)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value, info: ValidationInfo):
        return refuse_bool(value, cls.model_fields[info.field_name].annotation)


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
