"""The validated run configuration: what Hydra composes, checked for keys and types.

Hydra composes the YAML tree (recipe + groups + command-line overrides); pydantic then checks every
key and type, so a typo or a wrong type is one clear line naming the key instead of a crash later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from losia_cli.data.config import DataConfig
from losia_cli.eval.command import EvalConfig
from losia_cli.methods import MethodConfig
from losia_cli.models import ModelConfig


class ConfigError(ValueError):
    """A recipe or override that does not validate; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Strict):
    max_steps: int | None = Field(None, gt=0)  # wins over epochs when both are set
    epochs: float | None = Field(None, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)  # micro-batches per optimizer step
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine floor as a fraction of lr
    max_grad_norm: float | None = 1.0  # None disables clipping
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast; weights keep model.dtype
    activation_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(1, gt=0)
    save_every: int | None = Field(None, gt=0)  # checkpoint every N optimizer steps
    keep_last_n: int = Field(2, gt=0)
    num_threads: int | None = None  # CPU intra-op threads; None = torch default

    @model_validator(mode="after")
    def _length(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        return self


class RunSection(_Strict):
    name: str | None = None  # default: <recipe>-<method>-<timestamp>
    output_dir: str = "runs"
    resume: str | None = None  # "auto" = latest complete checkpoint of this run dir, or a path
    overwrite: bool = False  # reuse an existing run dir that holds a finished run


class DistConfig(_Strict):
    name: Literal["single", "ddp", "fsdp", "zero2", "zero3"] = "single"
    num_processes: int = Field(1, gt=0)


class RunConfig(_Strict):
    recipe: str | None = None
    seed: int = 42
    model: ModelConfig
    data: DataConfig
    method: MethodConfig
    train: TrainConfig
    run: RunSection = RunSection()
    dist: DistConfig = DistConfig()
    eval: EvalConfig = EvalConfig()

    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


def format_validation_error(e: ValidationError) -> str:
    return "; ".join(_format_error(err) for err in e.errors())


def _format_error(err: dict) -> str:
    key = ".".join(str(part) for part in err["loc"])
    # Discriminated unions add the tag to the path ("method.lora.rank"); users wrote "method.rank".
    for tag in ("full", "lora", "dora", "pissa", "galore", "losia", "losia_pro"):
        key = key.replace(f"method.{tag}.", "method.")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{key}: {err['msg']}{shown}"


def _method_classes() -> dict[str, type[BaseModel]]:
    union = get_args(get_args(MethodConfig)[0])
    return {name: cls for cls in union for name in get_args(cls.model_fields["name"].annotation)}


def _drop_other_methods_keys(method: dict, notes: list[str]) -> dict:
    """A recipe tuned for one method (say `method.period` for LoSiA) must not break `method=lora`:
    keys that belong to another method are dropped with a note; unknown keys still fail."""
    classes = _method_classes()
    chosen = classes.get(method.get("name"))
    if chosen is None:
        return method
    elsewhere = {key for cls in classes.values() for key in cls.model_fields} - set(chosen.model_fields)
    for key in sorted(set(method) & elsewhere):
        notes.append(f"method.{key}={method[key]!r} does not apply to {method['name']}; ignored")
    return {k: v for k, v in method.items() if k not in elsewhere}


def validate(cfg: DictConfig | dict, notes: list[str] | None = None) -> RunConfig:
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    raw.pop("hydra", None)
    if isinstance(raw.get("method"), dict):
        raw["method"] = _drop_other_methods_keys(raw["method"], notes if notes is not None else [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
