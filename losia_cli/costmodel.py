"""The exact, device-independent cost of one training step per method, from the real shapes on `meta`.

Every method is built and applied exactly as `losia bench` does it (bench's `build_model` and
`make_method`, then prepare -> param_groups -> optimizer -> one step -> on_step), but on the meta
device: no memory is allocated and no arithmetic runs, so a 7B model costs seconds. Per method:

- `flops`: matmul FLOPs of forward + backward + `on_step` (LoSiA's scoring GEMM G^T X happens in
  backward), counted by torch.utils.flop_counter.FlopCounterMode. Elementwise work and the optimizer
  step (GaLore's projections and SVDs live there) are not counted.
- `flops_analytic`: the same from closed formulas over the model's linear shapes (`analytic_flops`);
  None where no formula is kept (DoRA, whose weight-norm path peft builds).
- bytes: `param_bytes`, `grad_bytes` (after backward), `optimizer_state_bytes` (after the step),
  `activation_bytes` (every tensor autograd saves in one forward, unique storages, parameters
  excluded) and `scorer_bytes` (LoSiA's fp32 m x n gradient accumulator and two EMAs of the layer that
  scores at step 0). `accounted_bytes` is their sum: what the step holds at its peak, without allocator
  slack and transient workspaces.

`python -m losia_cli.costmodel --model llama2_7b --out benchmarks/results/meta_llama2_7b.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import sys
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AttentionInterface

from losia_cli import atomic
from losia_cli.bench.runner import BETAS, EPS, LONG_RUN, LR, make_method
from losia_cli.bench.shapes import SHAPES, build_model
from losia_cli.errors import BenchError
from losia_cli.engine.records import versions
from losia_cli.methods.base import TrainContext, WarmupCosine

METHODS = ["floor", "full", "lora", "lora_bf16", "dora", "pissa", "galore", "losia", "losia_pro"]


def _method(name: str, lora_rank: int):
    """bench's method, plus `lora_bf16` (adapters in the base dtype). PiSSA on meta is LoRA: its SVD
    initialisation needs values, and it changes only the initial values, never a shape."""
    if name in ("lora_bf16", "pissa"):
        from losia_cli.methods import build_method
        from losia_cli.methods.peft_methods import PeftMethodConfig

        dtype = "base" if name == "lora_bf16" else "fp32"
        return build_method(PeftMethodConfig(name="lora", rank=lora_rank, adapter_dtype=dtype))
    method = make_method(name, lora_rank, None, None)
    if name.startswith("losia"):
        # Its subnets.jsonl record reads the indices back to the host, which meta tensors cannot do;
        # the cost model writes no records.
        method._log = lambda *args, **kwargs: None
    return method


@contextlib.contextmanager
def _meta_autocast():
    """LoSiA-Pro's autograd function is made per autocast device type, and autocast knows no `meta`;
    on meta no autocast is on, so the CPU variant (autocast off) is the same function."""
    from losia_cli.methods.losia import autograd

    function_for = autograd._function_for

    def meta_as_cpu(device_type: str):
        return function_for("cpu" if device_type == "meta" else device_type)

    with mock.patch.object(autograd, "_function_for", meta_as_cpu):
        yield


def _fused_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention as the fused kernel a GPU runs (torch's flash op, which has meta shapes): it
    saves q, k, v, the output and a logsumexp, never the T x T probabilities, and its backward
    recomputes the scores. On meta, plain sdpa would take the math path and save the probabilities.
    The mask is not needed: the bench batch is unpadded, so causal is the whole mask."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _storage(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it); works on meta, where every data_ptr is 0."""
    return t.untyped_storage()._cdata


def measure(model: str | dict, name: str, batch: int, seq: int, dtype: str, lora_rank: int = 8) -> dict:
    """One method's FLOPs and bytes for one optimizer step (grad_accum 1) at B x T, on meta."""
    method = _method(name, lora_rank)
    ctx = TrainContext(schedule=WarmupCosine(total_steps=10), total_steps=LONG_RUN)
    AttentionInterface.register("meta_fused", _fused_attention)
    base = build_model(model, "meta", dtype, seed=0)
    base.set_attn_implementation("meta_fused")
    net = method.prepare(base, ctx)
    net.train()
    groups = method.param_groups(LR, 0.0)
    make = getattr(method, "make_optimizer", None)
    optimizer = (make(groups, LR, BETAS, EPS) if make else torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
                 ) if groups else None
    params = list(net.parameters())
    param_storages = {_storage(p) for p in params}
    saved: dict[int, torch.Tensor] = {}  # keeps each storage alive, so no id is reused meanwhile

    def pack(t: torch.Tensor) -> torch.Tensor:
        if _storage(t) not in param_storages:
            saved.setdefault(_storage(t), t)
        return t

    vocab = net.get_output_embeddings().weight.shape[0]
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, _meta_autocast():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = net(input_ids=ids).logits
        # The engine's token cross-entropy (fp32 logits), without importing the training stack.
        loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        activation_bytes = sum(t.untyped_storage().nbytes() for t in saved.values())
        saved.clear()
    grad_bytes = _bytes(p.grad for p in params if p.grad is not None)
    scorer_bytes = _bytes(
        t for m in net.modules() if getattr(m, "scorer", None) is not None for t in m.scorer.state_dict().values()
    )
    flops = counter.get_total_flops()
    if optimizer is not None:
        optimizer.step()
    with counter, _meta_autocast():  # entering again starts a new count
        method.on_step(0, optimizer)
    flops += counter.get_total_flops()
    state = [] if optimizer is None else [v for s in optimizer.state.values() for v in s.values()]
    row = {
        "method": name,
        "trainable_params": sum(p.numel() for g in groups for p in g["params"]),
        "flops": flops,
        "flops_analytic": analytic_flops(net, name, batch, seq),
        "param_bytes": _bytes(params),
        "grad_bytes": grad_bytes,
        "optimizer_state_bytes": _bytes(v for v in state if isinstance(v, torch.Tensor) and v.device.type == "meta"),
        "activation_bytes": activation_bytes,
        "scorer_bytes": scorer_bytes,
    }
    row["accounted_bytes"] = sum(row[k] for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes",
                                                  "activation_bytes", "scorer_bytes"))
    return row


def _linears(net: nn.Module) -> list[tuple[str, nn.Module, int, int]]:
    """(name, module, m, n) of every linear map of the base model: nn.Linear, LoSiA's wrapper (which
    holds the frozen W) and peft's LoRA layer (whose `base_layer` does); never an adapter's own A or B."""
    found = []
    for name, module in net.named_modules():
        if hasattr(module, "sub") or hasattr(module, "lora_A"):
            found.append((name, module, module.out_features, module.in_features))
        elif isinstance(module, nn.Linear) and ".lora_" not in name and not name.endswith(".base_layer"):
            found.append((name, module, *module.weight.shape))
    return found


def analytic_flops(net: nn.Module, name: str, batch: int, seq: int) -> int | None:
    """Matmul FLOPs of one step from closed formulas (N = B*T tokens, 2 FLOPs per multiply-add):

    floor      4N * sum(mn)   [forward X W^T and backward G W for every linear, output head included]
               + 14 B heads T^2 d per layer  [fused causal attention as FlopCounterMode counts it: 2 GEMMs
                                              forward, 5 backward (scores recomputed), full T^2]
    full       floor + 2N * sum(mn)              (every weight gradient; galore alike before projection)
    lora       floor - 2N * sum_first(mn)        (no input gradient into the embeddings: the first
               + 6N * sum_t r(m+n) - 2N * sum_first r n   q/k/v take nothing back)
    losia      floor - 2N * sum_first(mn) + 2N * sum_t(mn)          (dense autograd: full W gradients)
    losia_pro  floor - 2N * sum_first(mn) + 2N * sum_t |R||C| + 2N * sum_scoring(mn)

    sum_t runs over the method's targets, sum_first over the linears reading the embeddings (first
    layer's q, k, v), sum_scoring over the layer scoring this step. The issue's 1.017 for Pro/floor at
    7B leaves the first-layer term out (1.0166 without it, 1.0128 with it at B16xT256).
    """
    if name == "dora":
        return None
    n_tok = batch * seq
    cfg = net.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attention = 14 * batch * heads * seq * seq * head_dim * cfg.num_hidden_layers
    linears = _linears(net)
    all_mn = sum(m * n for _, _, m, n in linears)
    floor = 4 * n_tok * all_mn + attention
    if name == "floor":
        return floor
    if name in ("full", "galore"):
        return floor + 2 * n_tok * all_mn
    first = [(m, n) for lname, _, m, n in linears if _reads_embeddings(lname)]
    base = floor - 2 * n_tok * sum(m * n for m, n in first)
    if name in ("lora", "lora_bf16", "pissa"):
        adapted = [(lname, module.r["default"], m, n) for lname, module, m, n in linears if hasattr(module, "lora_A")]
        return (base + 6 * n_tok * sum(r * (m + n) for _, r, m, n in adapted)
                - 2 * n_tok * sum(r * n for lname, r, _, n in adapted if _reads_embeddings(lname)))
    targets = [module for _, module, _, _ in linears if hasattr(module, "sub")]
    if name == "losia":
        return base + 2 * n_tok * sum(t.weight.numel() for t in targets)
    scoring = sum(t.weight.numel() for t in targets if t.scorer is not None)
    return base + 2 * n_tok * (sum(t.sub.numel() for t in targets) + scoring)


def _reads_embeddings(linear_name: str) -> bool:
    """The linears whose input is the (normalised) embedding output: the first block's q, k, v."""
    return ".layers.0." in linear_name and linear_name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")


def cost_table(model: str | dict, methods: list[str], batch: int = 16, seq: int = 256, dtype: str = "bf16",
               lora_rank: int = 8) -> list[dict]:
    """One row per method (see `measure`), each with its ratios to `floor` and `lora` when measured."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method {unknown[0]!r} for the cost model; known: {', '.join(METHODS)}")
    rows = [measure(model, name, batch, seq, dtype, lora_rank) for name in methods]
    by_name = {row["method"]: row for row in rows}
    for row in rows:
        for ref in ("floor", "lora"):
            if ref in by_name:
                row[f"flops_vs_{ref}"] = row["flops"] / by_name[ref]["flops"]
                row[f"accounted_vs_{ref}"] = row["accounted_bytes"] / by_name[ref]["accounted_bytes"]
    return rows


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (printed by the CLI, committed next to the JSON)."""
    head = ["method", "trainable", "TFLOP/step", "vs floor", "analytic", "params", "grads", "opt state",
            "activations", "scorer", "accounted", "vs lora"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        analytic = "-" if r["flops_analytic"] is None else f"{r['flops_analytic'] / 1e12:.3f}"
        cells = [r["method"], f"{r['trainable_params']:,}", f"{r['flops'] / 1e12:.3f}",
                 f"{r.get('flops_vs_floor', float('nan')):.4f}x", analytic]
        cells += [_size(r[k]) for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "activation_bytes",
                                        "scorer_bytes", "accounted_bytes")]
        cells.append(f"{r.get('accounted_vs_lora', float('nan')):.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(model: str, methods: list[str], batch: int, seq: int, dtype: str, lora_rank: int) -> dict:
    """cost_table with what produced it, in the layout of a `losia bench` result."""
    rows = cost_table(model, methods, batch, seq, dtype, lora_rank)
    config = dict(model=model, batch=batch, seq=seq, dtype=dtype, lora_rank=lora_rank, methods=methods)
    return {
        "meta": {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m losia_cli.costmodel", *sys.argv[1:]]),
            "device": "meta",
            "versions": versions(),
            "config": config,
        },
        "results": {row["method"]: row for row in rows},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m losia_cli.costmodel", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama2_7b", help=f"one of {', '.join(SHAPES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank; LoSiA blocks match its parameters")
    parser.add_argument("--out", default=None, help="JSON path; a Markdown table is written next to it (.md)")
    args = parser.parse_args(argv)
    if args.model not in SHAPES:
        parser.exit(2, f"{parser.prog}: error: --model: unknown shape '{args.model}'; one of {', '.join(SHAPES)}\n")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        result = report(args.model, methods, args.batch, args.seq, args.dtype, args.lora_rank)
    except BenchError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    cfg = result["meta"]["config"]
    table = (f"{cfg['model']}, B{cfg['batch']}xT{cfg['seq']}, {cfg['dtype']}, one optimizer step, on meta "
             f"(`{result['meta']['command']}`)\n\n" + markdown_table(list(result["results"].values())) + "\n")
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(out, result)
        atomic.write_text(out.with_suffix(".md"), table)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
