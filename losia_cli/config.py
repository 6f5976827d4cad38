"""The validated run configuration: what Hydra composes, checked for keys and types.

Hydra composes the YAML tree (recipe + groups + command-line overrides); pydantic then checks every
key and type, so a typo or a wrong type is one clear line naming the key instead of a crash later.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Literal, Union, get_type_hints

from omegaconf import DictConfig
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, create_model, field_validator, model_validator

from losia_cli.data.config import DataConfig
from losia_cli.errors import ConfigError, omegaconf_message
from losia_cli.extras import require
from losia_cli.methods import config_classes, method_class, method_names
from losia_cli.schema import RULES, EvalConfig, Seed, Section, refuse_bool

# Method configs are plain dataclasses (pydantic-free for `losia bench`, see methods/base.py); as
# sections of the run schema they follow its rules too.
for _cls in config_classes():
    _cls.__pydantic_config__ = {**_cls.__pydantic_config__, **RULES}

# The `method:` section: one registered method's config, picked by name.
MethodConfig = Annotated[Union[config_classes()], Field(discriminator="name")]


class ModelConfig(Section):
    """The base model and how its weights are held (recipes/model/*.yaml)."""

    name_or_path: str
    """package:smollm2-135m | package:gemma3-270m | a local HF dir | a local .gguf | a hub id."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    dtype: Literal["fp32", "bf16", "fp16", "fp64"] = "fp32"
    """Dtype the weights are held in (fp64: for exact comparisons of runs, as the tests make; slow)."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers (sdpa, eager, flash_attention_2); null: the model's own
    choice (sdpa where the architecture supports it, else eager)."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (needed by some hub models)."""

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, name: str | None) -> str | None:
        """Refused here, not by transformers once the model has begun to load."""
        from transformers.integrations.hub_kernels import is_kernel
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]  # the check transformers makes itself
        if name is not None and name not in known and not is_kernel(name):
            raise ValueError(f"transformers knows {', '.join(known)} or a hub kernel (org/repo[@rev][:name])")
        return name


class TrainConfig(Section):
    """How long and how to optimize (recipes/train/*.yaml)."""

    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to train; wins over epochs when both are set."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training data (fractions allowed)."""
    micro_batch_size: int = Field(4, gt=0)
    """Samples per forward/backward pass (per process)."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    """Linear warmup as a fraction of the optimizer steps."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine floor as a fraction of lr."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping norm; null disables clipping."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 = autocast; weights keep model.dtype."""
    activation_checkpointing: bool = False
    """Recompute activations in backward: less memory, more compute."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else CPU."""
    log_every: int = Field(1, gt=0)
    """Write a metrics.jsonl row every N optimizer steps."""
    save_every: int | None = Field(None, gt=0)
    """Checkpoint every N optimizer steps; null: about every 10% of the run (at most every 500 steps)."""
    keep_last_n: int = Field(2, gt=0)
    """Periodic checkpoints kept on disk (older ones are deleted)."""
    eval_every: int | None = Field(None, gt=0)
    """Validation loss every N optimizer steps (needs data.val_split or data.val_source); null: at the
    checkpoint interval."""
    early_stopping_patience: int | None = Field(None, gt=0)
    """Stop after this many validations without a new best validation loss; null: never stop early."""
    num_threads: int | None = Field(None, gt=0)
    """CPU intra-op threads; null = torch default."""
    memory_profile: bool = False
    """CUDA only: record the allocator's history over the first 3 steps and write it to the run dir as
    memory_snapshot.pickle (drag it into https://pytorch.org/memory_viz). report.json's
    memory_breakdown is written for every run without it."""
    objective: Literal["sft", "dpo", "simpo"] = "sft"
    """What the loss is: sft = next-token cross-entropy on the targets; dpo = Direct Preference
    Optimization (sigmoid loss) on {prompt, chosen, rejected} pairs, against reference log-probs
    computed once with the starting weights; simpo = SimPO, reference-free, on length-normalised
    log-probs. dpo and simpo need a preference task (data.task=preference or preference_messages)."""
    beta: float = Field(0.1, gt=0)
    """dpo/simpo: inverse temperature of the implicit reward beta * log-prob (ratio); DPO ~0.1,
    SimPO ~2.0."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """dpo/simpo: conservative-DPO label smoothing, the assumed probability that a pair's preference
    is flipped; 0 = plain sigmoid loss."""
    simpo_gamma: float = Field(0.5, ge=0)
    """simpo: target reward margin gamma (SimPO's paper: gamma / beta ~ 0.5)."""

    @model_validator(mode="after")
    def _length(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        return self

    @model_validator(mode="after")
    def _objective_knobs(self):
        """A knob of another objective set off its default is a mistake, not a no-op (simpo_gamma
        under dpo); defaults pass (`losia recipes cp` writes every field)."""
        set_here = {k for k in ("beta", "label_smoothing", "simpo_gamma")
                    if getattr(self, k) != type(self).model_fields[k].default}
        applies = {"sft": set(), "dpo": {"beta", "label_smoothing"},
                   "simpo": {"beta", "label_smoothing", "simpo_gamma"}}[self.objective]
        stray = sorted(set_here - applies)
        if stray:
            raise ValueError(f"train.{stray[0]} does not apply to train.objective={self.objective}")
        return self


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")


class RunSection(Section):
    """Where the run directory goes, resuming, and where metrics are logged."""

    name: str | None = None
    """Run directory name under output_dir (one safe dir name: letters, digits, _ . + = -);
    null: <recipe>-<method>-<timestamp>."""
    output_dir: str = "runs"
    """Where run directories are created."""
    resume: str | None = None
    """auto = latest complete checkpoint of this run dir, or a checkpoint path."""
    overwrite: bool = False
    """Reuse an existing run dir that holds a finished run."""
    loggers: list[Literal["tensorboard", "wandb"]] = []
    """metrics.jsonl also goes to these."""
    wandb_project: str = "losia"
    """Weights & Biases project when loggers has wandb."""
    final: Literal["full", "delta", "both"] = "full"
    """What final/ holds for a method that changes base weights (losia, losia_pro, galore, full): the
    full weights, only the changed ones (delta.safetensors + delta_config.json, loaded onto the base
    by merge/chat/eval/export), or both. Adapter methods always write their adapter."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str | None) -> str | None:
        # The run dir is output_dir/name and run.overwrite deletes it: a name must not reach outside
        # (`.`, `..`, `a/../b`) or need quoting in a shell or #SBATCH line (spaces, `$`).
        if name is not None and not _SAFE_NAME.fullmatch(name):
            raise ValueError("must be one directory name of letters, digits and _ . + = - "
                             "(not starting with .)")
        return name

    @field_validator("loggers")
    @classmethod
    def _installed(cls, loggers: list[str]) -> list[str]:
        for name in loggers:  # at start, not after the model has loaded (package = extra = logger name)
            require(name, f"'losia-cli[{name}]'", f"logger {name}")
        return loggers


def _overrides_of(model: type[BaseModel]) -> type[BaseModel]:
    """`model` with every field optional: a stage names only the keys it changes, each one still
    checked for name and type here (the merged section is validated in full by losia_cli/continual)."""
    fields = {name: (field.annotation | None, None) for name, field in model.model_fields.items()}
    return create_model(f"{model.__name__}Overrides", __base__=Section, **fields)


DataOverrides, TrainOverrides = _overrides_of(DataConfig), _overrides_of(TrainConfig)


class StageConfig(Section):
    """One stage of a continual run (recipe key `stages:`; see losia_cli/continual.py)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # part of the stage's run dir name
    data: DataOverrides = Field(default_factory=DataOverrides)  # merged onto the run's `data:`
    train: TrainOverrides = Field(default_factory=TrainOverrides)  # merged onto the run's `train:`
    eval_tasks: list[str] = Field(min_length=1)  # TASK or TASK@SOURCE, as `losia eval tasks=[...]`


class DistConfig(Section):
    """How many processes train and how they share the work (recipes/dist/*.yaml).

    `losia train` relaunches itself through `accelerate launch` when this asks for more than one
    process; the multi-node fields are filled in by `losia slurm`'s batch script on each node.
    """

    name: Literal["single", "ddp", "fsdp", "zero2", "zero3"] = "single"
    """Strategy: one process, DDP, FSDP, or DeepSpeed ZeRO stage 2/3."""
    num_processes: int = Field(1, gt=0)
    """Processes in total, over all machines."""
    offload: bool = False
    """ZeRO: optimizer state (and, for zero3, parameters) in CPU memory."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto: nccl on CUDA, gloo on CPU."""
    num_machines: int = Field(1, gt=0)
    """Machines (nodes) taking part."""
    machine_rank: int = Field(0, ge=0)
    """This machine's index (filled in by `losia slurm`)."""
    main_process_ip: str | None = None
    """The first node's address when num_machines > 1."""
    main_process_port: int | None = Field(None, gt=0, lt=65536)
    """null: a free port on one machine (two runs on one box must not collide), 29500 across machines."""

    @property
    def deepspeed(self) -> bool:
        return self.name in ("zero2", "zero3")

    @property
    def shards_weights(self) -> bool:
        """FSDP and ZeRO-3 split the weights themselves over the processes."""
        return self.name in ("fsdp", "zero3")

    @model_validator(mode="after")
    def _consistent(self):
        if self.name == "single" and self.num_processes > 1:
            raise ValueError("dist=single runs one process; use dist=ddp (or fsdp, zero2, zero3) "
                             "with dist.num_processes > 1")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"dist.machine_rank={self.machine_rank} must be < dist.num_machines={self.num_machines}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("set dist.main_process_ip (the first node's address) when num_machines > 1")
        if self.offload and not self.deepspeed:
            raise ValueError("dist.offload applies to zero2 and zero3 only")
        return self


class RunConfig(Section):
    recipe: str | None = None
    """The recipe this config starts from (recipes/recipe/<name>.yaml)."""
    seed: Seed = 42
    """Seed of model init, data order and sampling."""
    model: ModelConfig
    data: DataConfig
    method: MethodConfig
    """The fine-tuning method (recipes/method/*.yaml); its `name` picks the method's own keys."""
    train: TrainConfig
    run: RunSection = RunSection()
    dist: DistConfig = DistConfig()
    eval: EvalConfig = EvalConfig()
    stages: list[StageConfig] | None = None
    """Continual learning: train these in sequence."""

    @field_validator("method", mode="before")
    @classmethod
    def _method_no_bool_for_number(cls, method):
        """The sections' check (schema.Section), for the method's dataclass."""
        if isinstance(method, dict) and method.get("name") in method_names():
            hints = get_type_hints(method_class(method["name"]).config_class)
            for key in hints.keys() & method.keys():
                try:
                    refuse_bool(method[key], hints[key])
                except ValueError as e:
                    raise ValueError(f"method.{key}: {e} (got {method[key]!r})") from None
        return method

    @model_validator(mode="after")
    def _dist_supports_method(self):
        """Refuse, before anything loads, the combinations that would train silently wrong."""
        dist, method = self.dist.name, self.method.name
        reason = method_class(method).unsupported_dist.get(dist)
        if reason:
            raise ValueError(reason.format(method=method, dist=dist))
        if self.train.objective != "sft" and self.data.packing:
            raise ValueError(f"data.packing: train.objective={self.train.objective} scores whole "
                             "sequences and does not pack them; set data.packing=false")
        if self.train.save_every and dist == "zero3":
            raise ValueError("train.save_every: checkpoints under dist=zero3 are not supported yet; "
                             "use dist=fsdp, ddp or zero2 for resumable runs")
        return self

    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


def format_validation_error(e: ValidationError, prefix: tuple = ()) -> str:
    """One line naming each bad key; `prefix` locates a nested model (e.g. ("stages", 1))."""
    return "; ".join(_format_error({**err, "loc": (*prefix, *err["loc"])}) for err in e.errors())


def _format_error(err: dict) -> str:
    key = ".".join(str(part) for part in err["loc"])
    # Discriminated unions add the tag to the path ("method.lora.rank"); users wrote "method.rank".
    for tag in method_names():
        key = key.replace(f"method.{tag}.", "method.")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    message = err["msg"].removeprefix("Value error, ")  # our own validators' messages name their keys
    if message.startswith("method."):  # a method config's own check: the message is the whole line
        return message
    return f"{key}: {message}{shown}" if key else message


def field_docs(cls: type) -> dict[str, str | None]:
    """Each field's docstring, for a pydantic model or a method's config dataclass."""
    if issubclass(cls, BaseModel):
        return {name: field.description for name, field in cls.model_fields.items()}
    return {name: prop.get("description") for name, prop in TypeAdapter(cls).json_schema()["properties"].items()}


def _method_keys() -> dict[str, set[str]]:
    return {name: {f.name for f in dataclasses.fields(method_class(name).config_class)} for name in method_names()}


def _drop_other_methods_keys(method: dict, notes: list[str]) -> dict:
    """A recipe tuned for one method (say `method.period` for LoSiA) must not break `method=lora`:
    keys that belong to another method are dropped with a note; unknown keys still fail."""
    keys = _method_keys()
    chosen = keys.get(method.get("name"))
    if chosen is None:
        return method
    elsewhere = set().union(*keys.values()) - chosen
    for key in sorted(set(method) & elsewhere):
        notes.append(f"method.{key}={method[key]!r} does not apply to {method['name']}; ignored")
    return {k: v for k, v in method.items() if k not in elsewhere}


def resolved(cfg: DictConfig) -> dict:
    """The composed config as plain dicts with every ${...} resolved; a bad interpolation (in a recipe
    or an override) is one line naming its key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(omegaconf_message(e)) from None


def validate(cfg: DictConfig | dict, notes: list[str] | None = None) -> RunConfig:
    raw = resolved(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    raw.pop("hydra", None)
    if isinstance(raw.get("method"), dict):
        raw["method"] = _drop_other_methods_keys(raw["method"], notes if notes is not None else [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def commented_yaml(cfg: BaseModel, indent: str = "") -> str:
    """`cfg` as YAML with each field's description above it (`losia recipes cp NAME my.yaml`)."""
    import textwrap

    import yaml

    values, lines = TypeAdapter(type(cfg)).dump_python(cfg, mode="json"), []
    for name, doc in field_docs(type(cfg)).items():
        value = getattr(cfg, name)
        section = isinstance(value, BaseModel) or dataclasses.is_dataclass(value)
        doc = doc or (type(value).__doc__ if isinstance(value, BaseModel) else None)
        if doc:
            lines += [""] if lines else []
            lines += textwrap.wrap(" ".join(doc.split()), 100, initial_indent=f"{indent}# ",
                                   subsequent_indent=f"{indent}# ")
        if section:
            lines.append(f"{indent}{name}:")
            lines.append(commented_yaml(value, indent + "  "))
        else:
            flow = yaml.safe_dump(values[name], default_flow_style=True, width=1 << 30, sort_keys=False)
            lines.append(f"{indent}{name}: {flow.strip().removesuffix('...').strip()}")  # a scalar ends in '...'
    return "\n".join(lines)
