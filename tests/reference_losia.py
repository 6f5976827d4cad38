"""An independent plain-PyTorch LoSiA, written from docs/method.md (sections 3-5), for the tests.

Nothing here comes from `losia_cli.methods.losia`. It trains the way the reference code does: every
targeted W stays a full trainable tensor, backward forms the full W.grad, the optimizer sees W.grad[R, C]
through a separate block tensor, the scoring slot's importance comes from W.grad and W, and each
re-localization gives the slot fresh Adam moments and a new LR ramp. The only shared contract is the
initial random blocks (a generator seeded by the run seed, drawn target by target in module order, the
output head last) and the data (`test_losia_support.batch`).

`adamw="torch"` steps the blocks with torch.optim.AdamW (our default optimizer); `adamw="hf"` with the
reference's HF-style AdamW (eps added to sqrt(v) before the bias correction, step counter kept across
resets: docs/method.md 5.1-5.3) and the reference's rewarm formula (docs/method.md 5.4).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from test_losia_support import batch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Block:
    name: str
    weight: nn.Parameter  # the full W, trainable
    rows: torch.Tensor
    cols: torch.Tensor
    value: torch.Tensor  # W[R, C], the tensor the optimizer steps
    slot: int
    expert: int | None = None  # the expert's index when `weight` is a 3-D expert parameter

    @property
    def matrix(self) -> torch.Tensor:
        """The (out, in) matrix the block sits in: W, or expert e's W[e]."""
        return self.weight if self.expert is None else self.weight[self.expert]

    @property
    def grad(self) -> torch.Tensor:
        return self.weight.grad if self.expert is None else self.weight.grad[self.expert]


class HFAdamW:
    """The reference's AdamW for one param group (docs/method.md 5.2): eps added to sqrt(v) before bias
    correction, decoupled decay on the block after the update, moments zeroed (step kept) on reset."""

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-6):
        self.params, self.betas, self.eps = list(params), betas, eps
        self.state: dict[int, dict] = {}

    @torch.no_grad()
    def step(self, lr: float, weight_decay: float) -> None:
        beta1, beta2 = self.betas
        for p in self.params:
            st = self.state.setdefault(id(p), {"step": 0, "m": None, "v": None})
            if st["m"] is None:
                st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
            st["step"] += 1
            st["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
            st["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            step_size = lr * math.sqrt(1 - beta2 ** st["step"]) / (1 - beta1 ** st["step"])
            p.addcdiv_(st["m"], st["v"].sqrt().add_(self.eps), value=-step_size)
            p.mul_(1 - lr * weight_decay)

    def reset(self) -> None:
        for st in self.state.values():
            st["m"] = st["v"] = None


def cosine(x: float, rho: float) -> float:
    return rho + (1.0 - rho) * 0.5 * (1.0 + math.cos(math.pi * min(max(x, 0.0), 1.0)))


def base_lr_factor(t: int, total: int, warmup: int, rho: float) -> float:
    if t < warmup:
        return t / warmup
    return cosine((t - warmup) / max(1, total - warmup), rho)


def rewarm_factor(t: int, restart, ramp: int, total: int, warmup: int, rho: float, hf: bool) -> float:
    if hf:  # docs/method.md 5.4, cosine_restarts: the ramp aims at c(t_r/(N-W)), then the LR jumps to the curve
        restart = restart or 0
        if t < warmup:
            return t / warmup
        if t - restart < ramp:
            return (t - restart) / ramp * cosine(restart / max(1, total - warmup), rho)
        return cosine((t - warmup) / max(1, total - warmup), rho)
    base = base_lr_factor(t, total, warmup, rho)
    return base if restart is None else base * min(1.0, (t - restart) / ramp)


def importance(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 for an fp64 model
    wg = weight.to(dtype) * grad.to(dtype)
    return (wg - 0.5 * wg * wg).abs()


def top(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(values, k).indices).values


def select(score: torch.Tensor, k_rows: int, k_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three greedy candidates, largest block mass wins (docs/method.md 3.4)."""
    rows_ind, cols_ind = top(score.sum(1), k_rows), top(score.sum(0), k_cols)
    rows_first = top(score[rows_ind].sum(0), k_cols)
    cols_first = top(score[:, cols_ind].sum(1), k_rows)
    candidates = [(rows_ind, cols_ind), (rows_ind, rows_first), (cols_first, cols_ind)]
    masses = [float(score[r][:, c].sum()) for r, c in candidates]
    return candidates[masses.index(max(masses))]


def train_reference(
    model: nn.Module,
    *,
    steps: int,
    period: int = 3,
    p: float = 0.25,
    lm_head_rows: float = 0.0,
    schedule: str = "async",
    dense_extras: str = "none",
    grad_accum: int = 1,
    lr: float = 1e-2,
    weight_decay: float = 0.01,
    total_steps: int = 50,
    warmup: int = 5,
    rho: float = 0.1,
    seed: int = 1,
    adamw: str = "torch",
    ema_betas=(0.85, 0.85),
) -> list[tuple[int, str, int | None, list[int], list[int]]]:
    """Train `model` in place; returns the block moves as (step, weight, expert, rows, cols).

    Mixture-of-experts (Mixtral / Qwen3-MoE `mlp.experts`, 3-D gate_up_proj and down_proj): a block per
    expert; an expert the router sent no token in a step gets no gradient step and no score, and one
    never scored in its slot keeps its block."""
    head = model.get_output_embeddings()
    found = []  # (weight name, parameter, expert or None), in module order; the head last
    hits: dict[int, set[int]] = {}  # id(experts module) -> experts that got tokens this step
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod is not head and name.split(".")[-1] in PROJECTIONS:
            found.append((f"{name}.weight", mod.weight, None))
        elif name.endswith("mlp.experts"):
            for param in ("gate_up_proj", "down_proj"):
                stack = getattr(mod, param)
                found += [(f"{name}.{param}", stack, e) for e in range(stack.shape[0])]
            mod.register_forward_hook(
                lambda module, args, out: hits.setdefault(id(module), set()).update(args[1].flatten().tolist()))
    if lm_head_rows > 0:
        found.append(("lm_head.weight", head.weight, None))
    layer = {name: -1 if name == "lm_head.weight" else int(re.search(r"layers\.(\d+)\.", name).group(1))
             for name, _, _ in found}
    slot_of = {lay: i for i, lay in enumerate(sorted(set(layer.values())))}
    num_slots = len(slot_of)
    stack_of = {id(getattr(mod, param)): id(mod) for name, mod in model.named_modules()
                if name.endswith("mlp.experts") for param in ("gate_up_proj", "down_proj")}

    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for name, weight, expert in found:
        matrix = weight if expert is None else weight[expert]
        m, n = matrix.shape
        is_head = name == "lm_head.weight"
        k_rows = max(1, math.floor((lm_head_rows if is_head else p) * m + 1e-9))
        k_cols = n if is_head else max(1, math.floor(p * n + 1e-9))
        rows = torch.sort(torch.randperm(m, generator=generator)[:k_rows]).values
        cols = torch.sort(torch.randperm(n, generator=generator)[:k_cols]).values
        weight.requires_grad_(True)
        value = matrix.detach()[rows][:, cols].clone()
        blocks.append(Block(name, weight, rows, cols, value, slot_of[layer[name]], expert))
    moved = [(0, b.name, b.expert, b.rows.tolist(), b.cols.tolist()) for b in blocks]

    def routed(b: Block) -> bool:
        """Whether the block's matrix saw tokens this step (always, for a dense layer)."""
        return b.expert is None or b.expert in hits.get(stack_of[id(b.weight)], ())

    weights = {id(b.weight) for b in blocks}
    if dense_extras == "all":
        extras = [q for q in model.parameters() if id(q) not in weights]
    elif dense_extras == "norms":
        extras = [q for mod in model.modules() if "norm" in type(mod).__name__.lower()
                  for q in mod.parameters(recurse=False)]
    else:
        extras = []
    extras = list({id(q): q for q in extras if id(q) not in weights}.values())
    for q in extras:
        q.requires_grad_(True)

    slot_params = [[b.value for b in blocks if b.slot == s] for s in range(num_slots)]
    if adamw == "hf":
        slot_opts = [HFAdamW(params) for params in slot_params]
        extras_opt = torch.optim.AdamW(extras, lr=lr, weight_decay=weight_decay) if extras else None
    else:
        groups = [{"params": params} for params in slot_params] + ([{"params": extras}] if extras else [])
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    restarts = [None] * num_slots
    ema = {}

    for t in range(steps):
        owner = (t // period) % num_slots
        if schedule == "sync":  # every slot scores in slot 0 of the cycle
            scoring = set(range(num_slots)) if owner == 0 else set()
        else:
            scoring = {owner}
        slot_lr = [lr * rewarm_factor(t, restarts[s], period, total_steps, warmup, rho, adamw == "hf")
                   for s in range(num_slots)]
        extras_lr = lr * base_lr_factor(t, total_steps, warmup, rho)
        hits.clear()
        for micro in range(grad_accum):
            ids = batch(t, micro)
            (model(input_ids=ids, labels=ids).loss / grad_accum).backward()
        with torch.no_grad():
            for b in blocks:
                if not routed(b):  # an idle expert: no gradient (AdamW skips it), no score
                    continue
                b.value.grad = b.grad[b.rows][:, b.cols].clone()
                if b.slot in scoring:  # EMAs from the step's full gradient and the pre-update W
                    i_t = importance(b.matrix, b.grad)
                    ibar, ubar = ema.get((b.name, b.expert), (torch.zeros_like(i_t), torch.zeros_like(i_t)))
                    ibar = ema_betas[0] * ibar + (1 - ema_betas[0]) * i_t
                    ubar = ema_betas[1] * ubar + (1 - ema_betas[1]) * (i_t - ibar).abs()
                    ema[(b.name, b.expert)] = (ibar, ubar)
            if adamw == "hf":
                for s, opt in enumerate(slot_opts):
                    opt.step(slot_lr[s], weight_decay)
                if extras_opt:
                    extras_opt.param_groups[0]["lr"] = extras_lr
                    extras_opt.step()
            else:
                for group, group_lr in zip(optimizer.param_groups, slot_lr + [extras_lr]):
                    group["lr"] = group_lr
                optimizer.step()
            model.zero_grad(set_to_none=True)
            for b in blocks:
                b.value.grad = None
                b.matrix[b.rows[:, None], b.cols] = b.value
            if (t + 1) % period:
                continue
            for s in scoring:
                for b in (b for b in blocks if b.slot == s):
                    if (b.name, b.expert) in ema:  # else never scored (an idle expert): the block stays
                        ibar, ubar = ema.pop((b.name, b.expert))
                        b.rows, b.cols = select(ibar * ubar, len(b.rows), len(b.cols))
                        b.value.copy_(b.matrix[b.rows][:, b.cols])
                        moved.append((t + 1, b.name, b.expert, b.rows.tolist(), b.cols.tolist()))
                    if adamw != "hf":
                        optimizer.state.pop(b.value, None)
                if adamw == "hf":
                    slot_opts[s].reset()
                restarts[s] = t + 1
    return moved
