"""What every section of the run schema shares (config.py, data/config.py, eval/config.py): unknown
keys refused, floats finite, strings non-empty, and a boolean never taken for a number (pydantic's
lax mode reads `seed=true` as 1). A field that allows NaN/inf says so with `Field(allow_inf_nan=True)`."""

from __future__ import annotations

from typing import Annotated, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

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
