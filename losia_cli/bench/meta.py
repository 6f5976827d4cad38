"""`losia bench device=meta`: the exact, device-independent cost of one training step per method.

Every method runs through bench's own Runner (build -> prepare -> optimizer -> one engine step with
the memory accounting), but on the meta device: nothing is allocated and no arithmetic runs, so a 7B
model costs seconds. Per method:

- `flops`: matmul FLOPs of the whole step (forward, backward, optimizer step, `on_step`; LoSiA's
  scoring GEMM G^T X happens in backward), counted by torch.utils.flop_counter.FlopCounterMode.
  Elementwise work is not counted, nor are SVDs (GaLore's projector refresh).
- `flops_analytic`: the same from closed formulas over the model's linear shapes (`analytic_flops`);
  None where no formula is kept (DoRA, whose weight-norm path peft builds; GaLore, whose projections
  run in its optimizer).
- bytes, as bench accounts them on a real device (runner.py): parameters, buffers, gradients,
  optimizer state, saved activations and LoSiA's scorer buffers; `accounted_bytes` is their sum.
- `ops` and `traffic_bytes` (`OpCounter`): the aten ops of the step that do work (an eager GPU step
  launches about one kernel each; views and allocations excluded) and the bytes they read and write,
  each op's distinct tensor inputs read once and its outputs written once (an in-place op's target
  both; an indexed write, only the part it writes): memory traffic without any cache reuse or fusion.
  Where arithmetic is about even (Pro/floor FLOPs ~1.01), this is what a GPU step's time differs by.
  LoSiA's scorer update counts here as its 8 eager ops; on CUDA it is one compiled kernel
  (methods/losia/importance.py).

Attention is counted as the fused kernel a GPU runs (see `_fused_attention`). PiSSA is measured as
LoRA: its SVD initialisation needs values, and it changes only initial values, never a shape.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from losia_cli.bench.plot import markdown
from losia_cli.bench.runner import Runner
from losia_cli.bench.shapes import Batch

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


# Ops that allocate without writing (no kernel on a GPU) or only read metadata.
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
              "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type"}


# In-place ops that write only the indexed part of their target, as much as their source (the last tensor
# argument; index_put_ may end with its `accumulate` flag): LoSiA's write-through of the block into W, for one.
_INDEXED_WRITES = {"index_copy_", "index_put_", "index_add_", "scatter_", "scatter_add_"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that do work and the bytes of their tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.traffic_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL:
            self.ops += 1
            if func.overloadpacket.__name__ in _INDEXED_WRITES:  # only the indexed part of the target moves
                source = [a for a in args if isinstance(a, torch.Tensor)][-1]
                self.traffic_bytes += _bytes_of((args[1:], kwargs)) + _bytes_of(source)
            else:
                self.traffic_bytes += _bytes_of((args, kwargs)) + _bytes_of(out)  # read, then written (in place too)
        return out


def _bytes_of(tree) -> int:
    tensors = {id(t): t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}  # mul(x, x) reads x once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure(spec: dict, name: str) -> dict:
    """One method's FLOPs and bytes for one optimizer step (grad_accum 1) of `spec`'s shape, on meta."""
    from transformers import AttentionInterface

    AttentionInterface.register("meta_fused", _fused_attention)
    ids = torch.zeros(spec["batch"], spec["seq"], dtype=torch.long, device="meta")
    runner = Runner("lora" if name == "pissa" else name, {**spec, "attention": "meta_fused"},
                    Batch(ids, spec["batch"] * (spec["seq"] - 1)))
    runner.step(account=True)  # the first step builds lazy state (optimizer moments): count a later one
    counter, ops = FlopCounterMode(display=False), OpCounter()
    with counter, ops:
        runner.step()
    row = {
        "method": name,
        "trainable_params": runner.method.describe()["trainable_params"],
        "flops": counter.get_total_flops(),
        "ops": ops.ops,
        "traffic_bytes": ops.traffic_bytes,
        "flops_analytic": analytic_flops(runner.model, name, spec["batch"], spec["seq"]),
        **runner.memory,
    }
    runner.close()
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
    full       floor + 2N * sum(mn)              (every weight gradient)
    lora       floor - 2N * sum_first(mn)        (no input gradient into the embeddings: the first
               + 6N * sum_t r(m+n) - 2N * sum_first r n   q/k/v take nothing back)
    losia      floor - 2N * sum_first(mn) + 2N * sum_t(mn)          (dense autograd: full W gradients)
    losia_pro  floor - 2N * sum_first(mn) + 2N * sum_t |R||C| + 2N * sum_scoring(mn)

    sum_t runs over the method's targets, sum_first over the linears reading the embeddings (first
    layer's q, k, v), sum_scoring over the layer scoring this step. The issue's 1.017 for Pro/floor at
    7B leaves the first-layer term out (1.0166 without it, 1.0128 with it at B16xT256).
    """
    if name in ("dora", "galore"):
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
    if name == "full":
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


def cost_table(spec: dict, methods: list[str]) -> dict[str, dict]:
    """One row per method (see `measure`), each with its ratios to `floor` and `lora` when measured."""
    rows = {name: measure(spec, name) for name in methods}
    for row in rows.values():
        for ref in ("floor", "lora"):
            if ref in rows:
                row[f"flops_vs_{ref}"] = row["flops"] / rows[ref]["flops"]
                row[f"accounted_vs_{ref}"] = row["accounted_bytes"] / rows[ref]["accounted_bytes"]
                row[f"traffic_vs_{ref}"] = row["traffic_bytes"] / rows[ref]["traffic_bytes"]
    return rows


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (printed by the CLI, committed next to the JSON)."""
    head = ["method", "trainable", "TFLOP/step", "vs floor", "analytic", "ops", "traffic", "vs floor", "vs lora",
            "params", "grads", "opt state", "activations", "scorer", "accounted", "vs lora"]
    cells = []
    for r in rows:
        analytic = "-" if r["flops_analytic"] is None else f"{r['flops_analytic'] / 1e12:.3f}"
        cells.append([r["method"], f"{r['trainable_params']:,}", f"{r['flops'] / 1e12:.3f}",
                      f"{r.get('flops_vs_floor', float('nan')):.4f}x", analytic, f"{r['ops']:,}",
                      _size(r["traffic_bytes"]), f"{r.get('traffic_vs_floor', float('nan')):.2f}x",
                      f"{r.get('traffic_vs_lora', float('nan')):.2f}x",
                      *(_size(r[k]) for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "activation_bytes",
                                              "scorer_bytes", "accounted_bytes")),
                      f"{r.get('accounted_vs_lora', float('nan')):.2f}x"])
    return "\n".join(markdown(head, cells))
