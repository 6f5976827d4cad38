"""What a method trains in a model: the default targets, and the account of what was trained and left out.

The default (`method.target_modules: null`) is every linear map inside the decoder blocks, whatever the
architecture calls it: Llama's q/k/v/o/gate/up/down_proj, Phi-3's fused qkv_proj and gate_up_proj,
GPT-2's Conv1D c_attn/c_proj/c_fc, Falcon's query_key_value and dense_*. Not the output head, not the
routers of a mixture-of-experts block (they score experts, they do not map hidden states), and not the
embeddings. The experts of a mixture-of-experts block are 3-D parameters (one matrix per expert) in
transformers 5, not modules: a method trains them its own way (LoRA through peft's
`target_parameters`) or leaves them out, and says so.

`account(...)` is the method's record of what it trains (report.json's `targets`, the start line).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

ROUTER_NAMES = {"gate", "router", "shared_expert_gate"}


def is_conv1d(module: nn.Module) -> bool:
    """HF's GPT-2 style Conv1D (weight stored as (in, out)); checked by name so transformers stays lazy."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_router(name: str, module: nn.Module) -> bool:
    """A mixture-of-experts router: transformers 5 has its own router classes; older code an nn.Linear `gate`."""
    return name.rsplit(".", 1)[-1] in ROUTER_NAMES or type(module).__name__.endswith("Router")


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if head is not None else getattr(model, "lm_head", None)


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each decoder block, in order: the modules transformers never splits across
    devices (`_no_split_modules`, the decoder layer class), else the longest nn.ModuleList."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if type(module).__name__ in classes and not any(name.startswith(b + ".") for b, _ in blocks):
            blocks.append((name, module))
    if blocks:
        return blocks
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    name, longest = max(lists, key=lambda item: len(item[1]))
    return [(f"{name}.{i}", block) for i, block in enumerate(longest)]


@dataclass(frozen=True)
class Candidate:
    """A weight some method could train."""

    name: str  # qualified module name; for expert parameters `module.param`
    role: str  # linear | experts | router | head | outside
    block: int | None  # index of the decoder block it sits in
    matrices: int  # 1, or the number of experts of a 3-D expert parameter


def candidates(model: nn.Module) -> list[Candidate]:
    """Every linear map, router, expert parameter and the output head, with its role."""
    head = output_head(model)
    block_of = {name: i for i, (name, _) in enumerate(decoder_blocks(model))}
    found = []
    for name, module in model.named_modules():
        prefix = next((b for b in block_of if name.startswith(b + ".")), None)
        block = block_of[prefix] if prefix is not None else None
        if module is head:
            found.append(Candidate(name, "head", None, 1))
        elif block is not None and is_router(name, module):
            found.append(Candidate(name, "router", block, 1))
        elif is_linear(module):
            found.append(Candidate(name, "linear" if block is not None else "outside", block, 1))
        else:
            for param_name, param in module.named_parameters(recurse=False):
                if param.dim() == 3:  # a stack of per-expert matrices
                    found.append(Candidate(f"{name}.{param_name}", "experts", block, param.shape[0]))
    return found


def default_linears(model: nn.Module) -> list[str]:
    """The default targets: every linear map inside the decoder blocks (not routers, not the head)."""
    return [c.name for c in candidates(model) if c.role == "linear"]


def expert_params(model: nn.Module) -> list[str]:
    """The 3-D expert parameters inside the decoder blocks, as `module.param` names."""
    return [c.name for c in candidates(model) if c.role == "experts"]


def matches(name: str, targets: list[str] | str) -> bool:
    """`method.target_modules` semantics (as peft): a list matches a name or its dotted suffix, a string
    is a regex on the whole qualified name, "all-linear" matches everything (the caller filters)."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == key or name.endswith("." + key) for key in targets)


def named_experts(weights: list[Candidate], targets: list[str] | str | None) -> str | None:
    """The first expert parameter that `target_modules` names (the parameter or its module), if any;
    "all-linear" names linear modules only."""
    if targets is None or targets == "all-linear":
        return None
    return next((c.name for c in weights if c.role == "experts"
                 and (matches(c.name, targets) or matches(c.name.rsplit(".", 1)[0], targets))), None)


def kind(name: str) -> str:
    """The name a user writes in target_modules: the last part (`experts.down_proj` for an expert parameter)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 and parts[-2] == "experts" else parts[-1]


# Why a candidate the method does not train was left out, by role; a method adds its own (head, experts).
WHY = {
    "head": "output head (name it in method.target_modules to train it)",
    "router": "MoE router, it scores experts (name it in method.target_modules to train it)",
    "outside": "outside the decoder blocks",
    "linear": "not in method.target_modules",
    "experts": "MoE expert weights, not in method.target_modules",
}


def account(weights: list[Candidate], trained: dict[str, int], why: dict[str, str] | None = None) -> dict:
    """report.json's `targets`: what a method trains ({qualified name: trainable parameters}) and each
    kind of the model's `candidates` (taken before the method wrapped anything) it leaves out, with the
    reason (`why` overrides WHY per role)."""
    reasons = {**WHY, **(why or {})}
    left: dict[tuple[str, str], int] = Counter()
    for c in weights:
        if c.name not in trained:
            left[(kind(c.name), reasons[c.role])] += 1
    per_expert = {c.name: c.matrices for c in weights}
    return {
        "kinds": dict(Counter(kind(name) for name in trained)),
        "matrices": sum(per_expert.get(name, 1) for name in trained),  # an expert stack counts per expert
        "params": sum(trained.values()),
        "left_out": [{"kind": k, "count": n, "why": why_} for (k, why_), n in left.items()],
    }


def describe_line(targets: dict) -> str:
    """The start line's account: trained kinds and matrices, then what was left out and why."""
    if targets.get("all"):
        return "trains every parameter"
    kinds = ", ".join(targets["kinds"])
    text = f"trains {kinds} ({targets['matrices']} matrices)"
    if targets.get("note"):
        text += f", {targets['note']}"
    left = [f"{item['kind']}{' x%d' % item['count'] if item['count'] > 1 else ''} - {item['why']}"
            for item in targets["left_out"]]
    return text + (f"; left out: {'; '.join(left)}" if left else "")
