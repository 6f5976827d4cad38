"""A fine-tune shipped like an adapter: the weights a run changed, applied onto its base in one call.

A delta dir holds `delta.safetensors` (the changed values and where they go) and `delta_config.json`
(the base it was made from: name, content hash, dtype, architecture; the method; the file's checksum).
Values are the fine-tuned weights themselves, not differences, so base + delta is the fine-tune bit
for bit in the training dtype (a float difference added back would round).

Each changed tensor is stored in the smallest exact of three forms:
  dense    every value;
  sparse   int32/int64 flat positions + values;
  blocks   a union of row x column rectangles + the values inside it (row-major). LoSiA trains a
           block R_k x C_k per re-localization; grouping the columns of the union by the set of rows
           they hold gives disjoint rectangles, each stored as a row and a column bit mask. The union
           is taken from subnets.jsonl (the blocks the run trained) or from the changed entries.
The per-tensor layout sits in the safetensors metadata, so the file's size is the whole cost.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from losia_cli import atomic
from losia_cli.errors import LosiaError

CONFIG = "delta_config.json"
WEIGHTS = "delta.safetensors"
FORMAT = "losia-delta"
VERSION = 1
# The mark apply_delta leaves on a model's config: the checksums of the deltas applied to it.
MARK = "losia_deltas"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class DeltaError(LosiaError, ValueError):
    """A delta that cannot be made, read or applied to this model; the message says which and why."""


def _dtype_name(dtype: torch.dtype) -> str:
    from losia_cli.models import DTYPES

    return next(name for name, d in DTYPES.items() if d == dtype)


def parameters(model) -> dict[str, torch.Tensor]:
    """The model's weights by name, a tied tensor once (under its first name, as safetensors keeps it)."""
    return dict(model.named_parameters())


def weights_hash(model, dtype: torch.dtype) -> str:
    """SHA-256 over every weight's name, shape and bytes in `dtype`: the base a delta was made from."""
    digest = hashlib.sha256()
    for name, param in sorted(parameters(model).items()):
        tensor = param.detach().to("cpu", dtype).contiguous()
        digest.update(f"{name}:{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def changed_mask(base: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Where the bits differ (-0.0 vs 0.0 and NaN payloads count: the delta is exact)."""
    view = _INT_VIEW[base.element_size()]
    return base.contiguous().view(view) != final.contiguous().view(view)


# --- the three forms --------------------------------------------------------------------------
def group_columns(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint rectangles covering `mask` [m, n] exactly: (rows [G, m] bool, cols [G, n] bool), the
    columns grouped by the set of rows they hold."""
    used = mask.any(0).nonzero().squeeze(1)
    signatures, group = torch.unique(mask[:, used].T, dim=0, return_inverse=True)
    cols = torch.zeros(len(signatures), mask.shape[1], dtype=torch.bool)
    cols[group, used] = True
    return signatures, cols


def ungroup(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The mask that `group_columns` split, back from its rectangles."""
    # counts are at most G (< 2^24), exact in fp32
    return (rows.T.float() @ cols.float()) > 0


def _pack(bits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.numpy(), axis=-1).reshape(-1))


def _unpack(packed: torch.Tensor, groups: int, length: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy().reshape(groups, -1), axis=-1, count=length).astype(bool))


def _encode(base: torch.Tensor, final: torch.Tensor, union: torch.Tensor | None, values_dtype: torch.dtype,
            coord_dtype: torch.dtype) -> tuple[list, dict] | None:
    """([form, shape, count], {"values", "coords", "bits"} tensors) for the smallest exact form of
    the change from `base` to `final`, None when nothing changed."""
    changed = changed_mask(base, final)
    k = int(changed.sum())
    if k == 0:
        return None
    width = values_dtype.itemsize
    flat = final.reshape(-1)
    shape = list(final.shape)
    options = [(flat.numel() * width, ["dense", shape, flat.numel()], {"values": flat})]
    coords = changed.reshape(-1).nonzero().squeeze(1)
    options.append((k * (width + coord_dtype.itemsize), ["sparse", shape, k],
                    {"coords": coords.to(coord_dtype), "values": flat[coords]}))
    if final.ndim == 2:
        masks = [changed]
        if union is not None and not (changed & ~union).any():  # the trained blocks hold every change
            masks.append(union)
        for mask in masks:
            rows, cols = group_columns(mask)
            bits = torch.cat([_pack(rows), _pack(cols)])
            options.append((bits.numel() + int(mask.sum()) * width, ["blocks", shape, len(rows)],
                            {"bits": bits, "values": final[mask]}))
    _, layout, parts = min(options, key=lambda option: option[0])
    parts["values"] = parts["values"].to(values_dtype)
    return layout, parts


def _decode(layout: list, values: torch.Tensor, coords: torch.Tensor, bits: torch.Tensor, into: torch.Tensor,
            cursor: dict) -> None:
    """Write one tensor's stored values into `into` (its base weight, in place)."""
    form, shape, count = layout

    def take(name: str, source: torch.Tensor, n: int) -> torch.Tensor:
        start = cursor[name]
        cursor[name] = start + n
        if cursor[name] > source.numel():
            raise DeltaError(f"{WEIGHTS}: its layout asks for more {name} than it holds (damaged)")
        return source[start:start + n]

    flat = into.view(-1)
    if form == "dense":
        flat.copy_(take("values", values, count))
    elif form == "sparse":
        positions = take("coords", coords, count).long()
        flat[positions] = take("values", values, count).to(into.dtype)
    else:
        m, n = shape
        row_bytes, col_bytes = -(-m // 8), -(-n // 8)
        packed = take("bits", bits, count * (row_bytes + col_bytes))
        rows = _unpack(packed[:count * row_bytes], count, m)
        cols = _unpack(packed[count * row_bytes:], count, n)
        mask = ungroup(rows, cols)
        into[mask] = take("values", values, int(mask.sum())).to(into.dtype)


# --- making a delta ---------------------------------------------------------------------------
def trained_blocks(run_dir: Path) -> dict[str, list[tuple[list, list]]]:
    """Per weight name, the (rows, cols) blocks subnets.jsonl says the run trained (empty for a
    method that does not localize)."""
    from losia_cli.engine.rundir import read_text
    from losia_cli.errors import RunFileError

    path = Path(run_dir) / "subnets.jsonl"
    text = read_text(path, optional=True) or ""
    blocks: dict[str, list] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            blocks.setdefault(record["module"], []).append((record["rows"], record["cols"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RunFileError(f"{path}:{number}: not a subnet record") from None
    return blocks


def _union(shape, blocks) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for rows, cols in blocks:
        mask[torch.tensor(rows, dtype=torch.long)[:, None], torch.tensor(cols, dtype=torch.long)] = True
    return mask


def build(base_model, final_model, blocks: dict, values_dtype: torch.dtype) -> tuple[dict, dict, dict]:
    """(tensors, per-tensor layout, stats) of the delta from `base_model` to `final_model`."""
    base, final = parameters(base_model), parameters(final_model)
    if set(base) != set(final) or any(base[k].shape != final[k].shape for k in base):
        raise DeltaError("the run's final/ and its base model have different weights (names or shapes)")
    # subnets.jsonl names a tied head lm_head.weight; parameters() keeps it under the embedding's name
    first = {id(p): name for name, p in reversed(list(final_model.named_parameters(remove_duplicate=False)))}
    blocks = {first[id(p)]: blocks[name] for name, p in final_model.named_parameters(remove_duplicate=False)
              if name in blocks}
    total = sum(p.numel() for p in final.values())
    coord_dtype = torch.int64 if max(p.numel() for p in final.values()) >= 2**31 else torch.int32
    layout, parts = {}, {"values": [], "coords": [], "bits": []}
    changed = 0
    for name, weight in final.items():
        weight, before = weight.detach().cpu(), base[name].detach().cpu()
        union = _union(weight.shape, blocks[name]) if name in blocks and weight.ndim == 2 else None
        encoded = _encode(before, weight, union, values_dtype, coord_dtype)
        if encoded is None:
            continue
        layout[name], tensors = encoded
        for key, tensor in tensors.items():
            parts[key].append(tensor.reshape(-1))
        changed += int(changed_mask(before, weight).sum())
    tensors = {key: torch.cat(chunks) for key, chunks in parts.items() if chunks}
    return tensors, layout, {"changed_params": changed, "total_params": total}


def write(base_model, final_model, out_dir: Path, *, blocks: dict, base: dict, method: str,
          values_dtype: torch.dtype, train_dtype: torch.dtype) -> dict:
    """Write WEIGHTS and CONFIG into `out_dir` (an existing dir: the caller makes it atomic)."""
    from safetensors.torch import save_file

    tensors, layout, stats = build(base_model, final_model, blocks, values_dtype)
    save_file(tensors, Path(out_dir) / WEIGHTS, metadata={"format": FORMAT, "layout": json.dumps(layout)})
    size = (Path(out_dir) / WEIGHTS).stat().st_size
    config = {
        "format": FORMAT, "version": VERSION, "method": method,
        "base": {**base, "sha256": weights_hash(base_model, train_dtype), "dtype": _dtype_name(train_dtype),
                 "model_type": base_model.config.model_type,
                 "architectures": list(getattr(base_model.config, "architectures", None) or [])},
        "dtype": _dtype_name(values_dtype),
        "exact": values_dtype == train_dtype,  # base + delta == final bit for bit
        "file_sha256": _file_sha256(Path(out_dir) / WEIGHTS),
        "bytes": size,
        **stats,
        "tensors": len(layout),
    }
    atomic.write_json(Path(out_dir) / CONFIG, config)
    return config


def _run_base(run_dir: Path):
    """(the run's base model in the training dtype, its ModelConfig, the run's config.yaml)."""
    from pydantic import ValidationError

    from losia_cli.config import ModelConfig, format_validation_error
    from losia_cli.errors import RunFileError
    from losia_cli.methods import exports_adapter
    from losia_cli.models import load_model, resolve_model_path, run_config

    config = run_config(run_dir)
    method = config["method"]["name"]
    if exports_adapter(method):
        raise DeltaError(f"{run_dir}: a {method} run ships an adapter already (final/); deltas and LoRA "
                         "extraction are for methods that change the base weights")
    try:
        cfg = ModelConfig.model_validate(config.get("model"))
    except ValidationError as e:
        raise RunFileError(f"{run_dir / 'config.yaml'}: {format_validation_error(e, ('model',))}") from None
    return load_model(cfg, resolve_model_path(cfg)), cfg, config


def base_identity(cfg) -> dict:
    return {"name_or_path": cfg.name_or_path, "revision": cfg.revision}


def export_delta(run_dir: Path, out: Path, *, dtype: str | None = None, force: bool = False) -> dict:
    """`losia export RUN --format delta`: the delta of a finished run against its base, in `out`."""
    from losia_cli.models import DTYPES, load_plain

    run_dir, out = Path(run_dir), Path(out)
    _check_out(out, force)
    base_model, cfg, config = _run_base(run_dir)
    method = config["method"]["name"]
    final = run_dir / "final"
    if (final / CONFIG).is_file() and not has_weights(final):  # run.final=delta: it is there already
        raise DeltaError(f"{final} holds a delta already ({CONFIG}); copy that dir")
    train_dtype = DTYPES[cfg.dtype]
    final_model = load_plain(final, train_dtype)
    with atomic.directory(out, overwrite=force, listed=True) as tmp:
        written = write(base_model, final_model, tmp, blocks=trained_blocks(run_dir), base=base_identity(cfg),
                        method=method, values_dtype=DTYPES[dtype or cfg.dtype], train_dtype=train_dtype)
        _copy_tokenizer(final, tmp)
    return written


def write_final(run_dir: Path, final_model, out_dir: Path, *, keep_full: bool) -> None:
    """run.final=delta/both: the run's delta into final/ (being built in `out_dir`), the full weights
    removed for `delta`. Adapter methods' final/ is their adapter already: left as it is."""
    from losia_cli.methods import exports_adapter
    from losia_cli.models import DTYPES, run_config

    if exports_adapter(run_config(run_dir)["method"]["name"]):
        return
    base_model, cfg, config = _run_base(run_dir)
    write(base_model, final_model, out_dir, blocks=trained_blocks(run_dir), base=base_identity(cfg),
          method=config["method"]["name"], values_dtype=DTYPES[cfg.dtype], train_dtype=DTYPES[cfg.dtype])
    if not keep_full:
        for path in Path(out_dir).iterdir():
            if path.name != WEIGHTS and (path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json")):
                path.unlink()


def has_weights(path: Path) -> bool:
    return any(p.name != WEIGHTS for p in Path(path).glob("*.safetensors"))


def _copy_tokenizer(source: Path, out: Path) -> None:
    """The run's tokenizer goes with the delta: it may carry the recipe's chat template."""
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(out) / name)


def _check_out(out: Path, force: bool) -> None:
    if reason := atomic.foreign(out):
        raise DeltaError(f"--out: {reason}; not replacing it, choose another --out")
    if out.exists() and not force:
        raise DeltaError(f"{out} already exists; pass --force to replace it")


# --- applying a delta -------------------------------------------------------------------------
def read_config(path: Path) -> dict:
    from losia_cli.engine.rundir import read_json

    config = read_json(Path(path) / CONFIG)
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise DeltaError(f"{Path(path) / CONFIG}: not a {FORMAT} v{VERSION} config")
    return config


def _read_weights(path: Path, config: dict) -> tuple[dict, dict]:
    """(tensors, layout) of WEIGHTS after its checksum matched the config's."""
    from safetensors import safe_open

    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise DeltaError(f"{file}: missing")
    if _file_sha256(file) != config.get("file_sha256"):
        raise DeltaError(f"{file}: does not match the checksum in {CONFIG} (truncated or damaged)")
    with safe_open(file, framework="pt") as handle:
        layout = json.loads(handle.metadata()["layout"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, layout


def apply_delta(model, path):
    """Apply the delta in `path` to `model` (its base, loaded in the delta's base dtype for an exact
    result) in place, and return it. Refuses, changing nothing, a model of another architecture, with
    other shapes, with other weights than the delta's base, or one this delta was applied to already."""
    from losia_cli.models import DTYPES

    path = Path(path)
    config = read_config(path)
    applied = getattr(model.config, MARK, None) or []
    if config["file_sha256"] in applied:
        raise DeltaError(f"{path}: this delta was applied to the model already")
    base = config["base"]
    if model.config.model_type != base["model_type"]:
        raise DeltaError(f"{path}: a delta for a {base['model_type']} model, this one is {model.config.model_type}")
    tensors, layout = _read_weights(path, config)
    params = parameters(model)
    for name, (_, shape, _) in layout.items():
        if name not in params:
            raise DeltaError(f"{path}: the model has no weight {name}")
        if list(params[name].shape) != shape:
            raise DeltaError(f"{path}: {name} is {shape} in the delta's base, {list(params[name].shape)} here")
    if weights_hash(model, DTYPES[base["dtype"]]) != base["sha256"]:
        raise DeltaError(f"{path}: made for another base ({base['name_or_path']}, sha256 {base['sha256'][:12]}); "
                         "this model's weights differ")
    empty = torch.empty(0)
    values, coords, bits = (tensors.get(key, empty) for key in ("values", "coords", "bits"))
    updated, cursor = {}, {"values": 0, "coords": 0, "bits": 0}
    for name, entry in layout.items():  # decode everything before the model changes
        updated[name] = params[name].detach().cpu().clone()
        _decode(entry, values, coords, bits, updated[name], cursor)
    with torch.no_grad():
        for name, tensor in updated.items():
            params[name].copy_(tensor)
    setattr(model.config, MARK, [*applied, config["file_sha256"]])
    return model


def load_with_delta(path: Path, base: str | None = None, dtype: str | None = None):
    """(model, tokenizer) for a delta dir: its base (`base`, else the one its config names) in the
    base dtype with the delta applied, and the delta's tokenizer (the base's when it has none)."""
    from losia_cli.config import ModelConfig
    from losia_cli.models import DTYPES, load_model, load_tokenizer, resolve_model_path

    config = read_config(path)
    cfg = ModelConfig(name_or_path=base or config["base"]["name_or_path"], dtype=config["base"]["dtype"],
                      revision=None if base else config["base"].get("revision"))
    resolved = resolve_model_path(cfg)
    model = apply_delta(load_model(cfg, resolved), path)
    if dtype:
        model = model.to(DTYPES[dtype])
    tokenizer = load_tokenizer(str(path) if (Path(path) / "tokenizer_config.json").is_file() else resolved)
    return model, tokenizer


# --- LoRA extraction ----------------------------------------------------------------------------
def _lora_factors(delta: torch.Tensor, rank: int | None, energy: float | None):
    """(B, A, rank) with B @ A the best rank-r approximation of `delta` (Eckart-Young), from an SVD in
    fp64. r: `rank`, else the least holding `energy` of the squared singular values, else the
    numerical rank (exact up to float rounding)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if rank is not None:
        r = min(rank, len(s))
    elif energy is not None:
        share = torch.cumsum(s**2, 0) / (s**2).sum()
        r = int((share < energy).sum()) + 1
    else:  # torch.linalg.matrix_rank's default tolerance
        r = int((s > s[0] * max(delta.shape) * torch.finfo(torch.float64).eps).sum())
    r = max(r, 1)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r], r


def export_lora(run_dir: Path, out: Path, *, rank: int | None = None, energy: float | None = None,
                force: bool = False) -> dict:
    """`losia export RUN --format lora`: each changed nn.Linear weight's delta as a PEFT LoRA pair by
    truncated SVD, written by PEFT itself (adapter_config.json + adapter_model.safetensors). Changes
    a LoRA cannot carry (norms, embeddings, a head tied to them) are counted and left out."""
    from peft import LoraConfig, get_peft_model

    from losia_cli.models import DTYPES, load_plain

    run_dir, out = Path(run_dir), Path(out)
    if rank is not None and rank < 1 or energy is not None and not 0 < energy <= 1:
        raise DeltaError("--rank must be >= 1 and --energy in (0, 1]")
    _check_out(out, force)
    base_model, cfg, config = _run_base(run_dir)
    final = parameters(load_plain(run_dir / "final", DTYPES[cfg.dtype]))
    tied = {id(p) for p in base_model.get_input_embeddings().parameters()}
    linear = {f"{name}.weight": name for name, module in base_model.named_modules()
              if isinstance(module, torch.nn.Linear) and id(module.weight) not in tied}
    factors, errors, left_out = {}, {}, 0
    for name, before in parameters(base_model).items():
        changed = int(changed_mask(before.detach(), final[name].detach()).sum())
        if not changed:
            continue
        if name not in linear:
            left_out += changed
            continue
        delta = final[name].detach().double() - before.detach().double()
        b, a, r = _lora_factors(delta, rank, energy)
        b, a = b.to(before.dtype), a.to(before.dtype)  # as the adapter stores them
        error = (b.double() @ a.double() - delta).norm() / delta.norm()
        factors[linear[name]] = (b, a)
        errors[linear[name]] = {"rank": r, "relative_frobenius_error": float(error)}
    if not factors:
        raise DeltaError(f"{run_dir}: no changed linear weight to extract a LoRA from")
    ranks = {name: e["rank"] for name, e in errors.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    # alpha = r everywhere: PEFT scales B @ A by alpha / r = 1
    lora = LoraConfig(r=common, lora_alpha=common, target_modules=sorted(factors), lora_dropout=0.0,
                      rank_pattern={k: v for k, v in ranks.items() if v != common},
                      alpha_pattern={k: v for k, v in ranks.items() if v != common})
    model = get_peft_model(base_model, lora)
    with torch.no_grad():
        for name, (b, a) in factors.items():
            module = model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
    with atomic.directory(out, overwrite=force, listed=True) as tmp:
        model.save_pretrained(tmp)
        _copy_tokenizer(run_dir / "final", tmp)
        report = {"method": config["method"]["name"], "rank": rank, "energy": energy,
                  "left_out_changed_params": left_out, "matrices": errors}
        atomic.write_json(tmp / "extraction.json", report)
    return report
