"""LoSiA / LoSiA-Pro behind the `Method` interface (docs/method.md 12).

Engine call order, per optimizer step `step` (= updates already taken):
    lr_factors(step, n) -> forward/backward of each micro-batch -> optimizer.step() -> on_step(step, opt)
`on_step` folds the scoring layer's gradient into its importance EMAs (W still holds the pre-update
block), writes every `sub` through into W, re-localizes the slot whose time is up, and switches the next
slot into scoring mode before the next forward.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from losia_cli.errors import ConfigError
from losia_cli.methods.base import DeviceTimer, Method, TrainContext
from losia_cli.methods.targets import (
    Candidate, account, candidates, is_conv1d, is_linear, matches, output_head,
)

from .config import LosiaConfig
from .layer import ExpertMatrix, SubnetExperts, SubnetLinear, expert_layout_why
from .schedule import Rewarm, SlotSchedule, layer_index
from .selection import magnitude_block, random_block, select_block
from .tied import route_tied_embedding

LM_HEAD_LAYER = -1  # the `layer` logged for the output head
HEAD_WHY = "output head (method.lm_head_rows trains it)"


@dataclass
class Target:
    """One subnet-trained matrix."""

    name: str  # qualified module name
    module: SubnetLinear
    slot: int
    layer: int  # decoder-layer index, LM_HEAD_LAYER for the output head
    p: float  # the rank factor the block size came from
    key: str  # the weight's state-dict key (subnets.jsonl's `module`)
    expert: int | None = None  # the expert's index in a 3-D expert parameter


def block_shape(m: int, n: int, cfg: LosiaConfig, is_head: bool) -> tuple[int, int, float]:
    """(|R|, |C|, p) of an (m, n) weight; floor(p*m) and floor(p*n), at least 1 each."""
    if is_head:
        p = cfg.lm_head_rows
        return max(1, math.floor(p * m + 1e-9)), n, p
    if cfg.lora_rank is not None:
        p = min(1.0, math.sqrt(cfg.lora_rank * (m + n) / (m * n)))
    else:
        p = cfg.rank_factor
    # The epsilon keeps exact products such as 0.125 * 64 from flooring to 7 through rounding.
    return max(1, min(m, math.floor(p * m + 1e-9))), max(1, min(n, math.floor(p * n + 1e-9))), p


def block_overlap(old_rows, old_cols, rows, cols) -> float:
    """Fraction of the new block's entries that were already in the old one."""
    shared_rows = torch.isin(rows, old_rows).sum().item()
    shared_cols = torch.isin(cols, old_cols).sum().item()
    return shared_rows * shared_cols / (rows.numel() * cols.numel())


class LosiaMethod(Method):
    name = "losia"
    names = ("losia", "losia_pro")
    config_class = LosiaConfig
    # FSDP2 runs the delta form on DTensors; ZeRO-3's flat partitions would need their own gather /
    # write-back and master-weight mapping for the block moves.
    unsupported_dist = {"zero3": "dist={dist} with {method} is not supported; use dist=fsdp to shard the "
                                 "weights, or dist=zero2 (the subnet's gradients and optimizer state are small already)"}

    def __init__(self, cfg: LosiaConfig):
        super().__init__(cfg)
        self.name = cfg.name
        self.targets: list[Target] = []
        self.slots: list[list[Target]] = []
        self.restarts: list[int | None] = []  # t_r per slot: update count when its block last moved
        self.next_step = 0  # the `step` the next on_step must carry
        self.slot_schedule: SlotSchedule | None = None
        self.rewarm: Rewarm | None = None
        self.relocalization_timer = DeviceTimer(None)  # scoring -> new block (report.json); set in prepare
        self.rank_disagreements = 0  # blocks a rank chose differently from rank 0 (must stay 0)
        self.delta = False
        self.tied_hook = None  # the embedding hook of a subnet-trained tied head
        self.has_extras = False  # whether a dense-extras param group follows the slot groups
        self.scoring: list[Target] = []  # the targets in scoring mode now
        self.scoring_slots: set[int] | None = None  # their slots (None: not set up yet)
        self.experts: dict[str, SubnetExperts] = {}  # the wrapped experts modules, by name
        self.experts_why: str | None = None  # why the default left the experts out

    # --- building -----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        """Wrap the targets in place. Call it on the model already on its device and in its dtype
        (`model.to(dtype)` afterwards would also cast the fp32 `sub` masters)."""
        super().prepare(model, ctx)
        cfg = self.cfg
        # FSDP shards W: write it only when a block moves (the delta form), not every step.
        self.delta = ctx.sharded_weights
        self.relocalization_timer = DeviceTimer(next(model.parameters()).device)
        # The other parts of on_step, for `losia bench`'s per-part table.
        self.scorer_timer = DeviceTimer(next(model.parameters()).device)
        self.write_through_timer = DeviceTimer(next(model.parameters()).device)
        model.requires_grad_(False)

        head = output_head(model)
        self.candidates = weights = candidates(model)
        if cfg.target_modules is None:  # every linear map inside the decoder blocks (methods/targets.py)
            chosen = {c.name for c in weights if c.role == "linear"}
            found = [(name, mod) for name, mod in model.named_modules() if name in chosen]
        else:
            found = [(name, mod) for name, mod in model.named_modules() if self._is_target(name, mod, head)]
        experts = self._expert_targets(model, weights)
        if cfg.lm_head_rows > 0:
            if not isinstance(head, nn.Linear):
                raise ConfigError("lm_head_rows > 0 needs an nn.Linear output head (get_output_embeddings())")
            found.append((next(name for name, module in model.named_modules() if module is head), head))
        if not found and not experts:
            if cfg.target_modules is None:
                raise ConfigError("no linear map found in the model's decoder blocks: name the targets in "
                                  "method.target_modules")
            raise ConfigError(f"no nn.Linear matched method.target_modules={cfg.target_modules!r}")

        block_of = {c.name: c.block for c in weights}
        layers = {name: LM_HEAD_LAYER if mod is head else self._layer(name, block_of) for name, mod in found}
        layers.update({c.name: self._layer(c.name, block_of) for c in experts})
        unplaced = [name for name, layer in layers.items() if layer is None]
        if unplaced:
            where = ("sit in no decoder block" if cfg.slot_pattern is None
                     else f"have no layer index by method.slot_pattern={cfg.slot_pattern!r}")
            raise ConfigError(
                f"{unplaced[:3]} {where}; set method.slot_pattern to a regex whose first group is the "
                "layer number (e.g. 'h\\.(\\d+)\\.' for GPT-2)"
            )
        # lm_head is slot 0 and decoder layers follow in index order (docs/method.md 3.6); layers without a target
        # get no slot, so no time slot idles.
        slot_of = {layer: slot for slot, layer in enumerate(sorted(set(layers.values())))}

        # Initial blocks are drawn target by target in module order (an expert parameter's experts in
        # index order), the output head last, from a generator seeded by the run seed: the same on every rank.
        generator = torch.Generator().manual_seed(ctx.seed)
        linears = {name: mod for name, mod in found if mod is not head}
        params_of: dict[str, list[str]] = {}  # experts module -> its targeted 3-D parameters
        for c in experts:
            module_name, param = c.name.rsplit(".", 1)
            params_of.setdefault(module_name, []).append(param)
        for name, module in list(model.named_modules()):
            if name in linears:
                self._wrap(model, name, module, slot_of[layers[name]], layers[name], generator)
            elif name in params_of:
                self._wrap_experts(model, name, module, params_of[name], slot_of, layers, generator)
        for name, module in found:
            if module is head:
                self._wrap(model, name, module, slot_of[LM_HEAD_LAYER], LM_HEAD_LAYER, generator)

        self.slots = [[t for t in self.targets if t.slot == slot] for slot in range(len(slot_of))]
        head_target = next((t for t in self.targets if t.layer == LM_HEAD_LAYER), None)
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if head_target and embedding is not None and embedding.weight is head_target.module.weight:
            self.tied_hook = route_tied_embedding(embedding, head_target.module)
        extras = self._dense_extras(model)
        for param in extras:
            param.requires_grad_(True)
        self.has_extras = bool(extras)
        self.slot_schedule = SlotSchedule(len(self.slots), cfg.period, sync=cfg.schedule == "sync")
        self.rewarm = Rewarm(ctx.schedule, cfg.rewarm_length, cfg.compat_reference_schedule)
        self.restarts = [None] * len(self.slots)
        self.next_step = 0
        self._set_scoring(0)
        for t in self.targets:
            self._log(t, step=0, score_mass=0.0, overlap=0.0, source=cfg.init)
        return model

    @classmethod
    def sized_config(cls, name: str, rank: int, *, rank_factor: float | None = None, period: int | None = None,
                     **options) -> LosiaConfig:
        """Parameter parity with LoRA-`rank` (docs/method.md 3.2) unless a rank factor p is given."""
        extra = {"rank_factor": rank_factor} if rank_factor is not None else {"lora_rank": rank}
        if period is not None:
            extra["period"] = period
        return cls.config_class(name=name, **extra)

    def _block(self, weight: torch.Tensor, is_head: bool, generator: torch.Generator):
        """(rows, cols, p) of the initial block of an (out, in) weight."""
        m, n = weight.shape
        k_rows, k_cols, p = block_shape(m, n, self.cfg, is_head)
        if self.cfg.init == "magnitude":
            return *magnitude_block(weight, k_rows, k_cols), p
        return *random_block(m, n, k_rows, k_cols, generator), p

    def _wrap(self, model: nn.Module, name: str, module: nn.Module, slot: int, layer: int,
              generator: torch.Generator) -> None:
        weight = module.weight.t() if is_conv1d(module) else module.weight
        rows, cols, p = self._block(weight, layer == LM_HEAD_LAYER, generator)
        cfg = self.cfg
        wrapped = SubnetLinear(module, rows, cols, pro=cfg.use_pro, fp32_sub=cfg.fp32_sub, delta=self.delta)
        model.set_submodule(name, wrapped)
        self.targets.append(Target(name, wrapped, slot, layer, p, f"{name}.weight"))

    def _wrap_experts(self, model: nn.Module, name: str, module: nn.Module, params: list[str],
                      slot_of: dict[int, int], layers: dict[str, int], generator: torch.Generator) -> None:
        """One SubnetLinear per expert of each targeted 3-D parameter, in a SubnetExperts in place of `module`."""
        cfg = self.cfg
        subnets = {}
        for param in params:
            key, stack = f"{name}.{param}", getattr(module, param).detach()
            layer = layers[key]
            subnets[param] = []
            for expert in range(stack.shape[0]):
                rows, cols, p = self._block(stack[expert], False, generator)
                wrapped = SubnetLinear(ExpertMatrix(stack[expert]), rows, cols, pro=cfg.use_pro, fp32_sub=cfg.fp32_sub)
                subnets[param].append(wrapped)
                path = f"{name}.subnets.{param}.{expert}"
                self.targets.append(Target(path, wrapped, slot_of[layer], layer, p, key, expert))
        self.experts[name] = SubnetExperts(module, subnets)
        model.set_submodule(name, self.experts[name])

    def _expert_targets(self, model: nn.Module, weights: list[Candidate]) -> list[Candidate]:
        """The 3-D expert parameters to train a block per expert in: every one by default, those
        `target_modules` names (the parameter or its module) otherwise. Named ones this run cannot train
        are refused; default ones are left out, with the reason in the account (`experts_why`)."""
        targets = self.cfg.target_modules
        if targets == "all-linear":  # linear modules only
            return []
        chosen = [c for c in weights if c.role == "experts" and (
            targets is None or matches(c.name, targets) or matches(c.name.rsplit(".", 1)[0], targets))]
        modules = dict(model.named_modules())
        for c in chosen:
            why = expert_layout_why(modules[c.name.rsplit(".", 1)[0]])
            if self.ctx.sharded_weights or self.ctx.dist.world_size > 1:
                why = f"MoE expert weights (3-D): {self.name} trains them in a single process only (dist=none)"
            if why and targets is not None:
                raise ConfigError(f"method.target_modules names {c.name}: {why}")
            if why:
                self.experts_why = why
                return []
        return chosen

    def _is_target(self, name: str, module: nn.Module, head: nn.Module | None) -> bool:
        return module is not head and is_linear(module) and matches(name, self.cfg.target_modules)

    def _layer(self, name: str, block_of: dict[str, int | None]) -> int | None:
        """The decoder-layer index of a target: its decoder block, or `slot_pattern`'s first group."""
        if self.cfg.slot_pattern is None:
            return block_of.get(name)
        return layer_index(name, self.cfg.slot_pattern)

    @property
    def extras(self) -> list[nn.Parameter]:
        """The densely trained parameters: whatever requires grad besides the blocks. Looked up each
        time, because FSDP swaps the parameter objects for sharded ones after prepare()."""
        subs = {id(t.module.sub) for t in self.targets}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in subs]

    def _dense_extras(self, model: nn.Module) -> list[nn.Parameter]:
        policy = self.cfg.dense_extras
        if policy == "none":
            return []
        subnet_tensors = {id(tensor) for t in self.targets for tensor in (t.module.weight, t.module.sub)}
        subnet_tensors |= {id(getattr(wrapper, param)) for wrapper in self.experts.values() for param in wrapper.subnets}
        if policy == "norms":
            candidates = [
                param
                for module in model.modules()
                if "norm" in type(module).__name__.lower()
                for param in module.parameters(recurse=False)
            ]
        else:  # "all": the reference trains every other parameter densely (docs/method.md 3.1)
            candidates = list(model.parameters())
        unique = {id(param): param for param in candidates if id(param) not in subnet_tensors}
        return list(unique.values())

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        groups = []
        for slot in self.slots:
            layer = slot[0].layer
            group = {
                "params": [t.module.sub for t in slot],
                "lr": lr,
                "weight_decay": weight_decay,
                "name": "losia.lm_head" if layer == LM_HEAD_LAYER else f"losia.layer{layer}",
            }
            groups.append(group)
        if self.extras:
            extras = {"params": self.extras, "lr": lr, "weight_decay": weight_decay, "name": "dense_extras"}
            groups.append(extras)
        return groups

    def make_optimizer(self, groups: list[dict], lr: float, betas, eps: float) -> torch.optim.Optimizer:
        """Plain AdamW; with `compat_eps` the subnet groups take the reference's eps (see below)."""
        optimizer = super().make_optimizer(groups, lr, betas, eps)
        if self.cfg.compat_eps:
            optimizer.register_step_pre_hook(self._reference_eps)
        return optimizer

    def _reference_eps(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """The reference's AdamW adds eps=1e-6 to sqrt(v) before the bias correction sqrt(1-beta2^t),
        torch adds eps after it: eps/sqrt(1-beta2^t) in torch gives the reference's update."""
        for group in optimizer.param_groups[: len(self.slots)]:
            state = optimizer.state.get(group["params"][0], {})
            step = float(state.get("step", 0)) + 1  # the counter this step will use
            group["eps"] = 1e-6 / math.sqrt(1.0 - group["betas"][1] ** step)

    # --- per step -----------------------------------------------------------------------------
    def lr_factors(self, step: int, num_groups: int) -> list[float]:
        factors = [self.rewarm.factor(step, restart) for restart in self.restarts]
        if self.has_extras:
            factors.append(self.ctx.schedule.factor(step))
        if num_groups != len(factors):
            raise ValueError(f"the optimizer has {num_groups} param groups, LoSiA made {len(factors)}")
        return factors

    @torch.no_grad()
    def on_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if step != self.next_step:
            raise RuntimeError(
                f"LoSiA on_step(step={step}) but expected step={self.next_step}: call it once after every "
                "optimizer.step(), with the number of updates taken before that one"
            )
        with self.scorer_timer.section():
            for t in self.scoring:
                scorer = t.module.scorer
                # The score must see the global gradient (the DDP mean), before W moves.
                self.ctx.dist.all_reduce_sum(scorer.grad_acc)
                if self.ctx.dist.world_size > 1:
                    scorer.grad_acc.div_(self.ctx.dist.world_size)
                if scorer.fed:  # an expert that received no tokens this step gets no score
                    scorer.update()
        if not self.delta:
            with self.write_through_timer.section():
                for t in self.targets:
                    t.module.write_through()
        slots = self.slot_schedule.relocalizing_slots(step)
        if slots:
            with self.relocalization_timer.section():
                for slot in slots:
                    for t in self.slots[slot]:
                        self._relocalize(t, step)
                    # A slot is one param group; resetting the group (not each `sub`) also covers ZeRO,
                    # whose optimizer holds one flat shard per group in place of the group's tensors.
                    self._reset_moments(optimizer.param_groups[slot]["params"], optimizer)
                    self.restarts[slot] = step + 1
            self.ctx.dist.params_changed()
            self.scoring_slots = None  # the moved blocks' scorers are freed: set scoring up anew
        self.next_step = step + 1
        self._set_scoring(self.next_step)

    def _reset_moments(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        for param in params:
            state = optimizer.state.get(param)
            if state and self.cfg.compat_keep_step_counter:
                for key, value in state.items():
                    if key != "step" and torch.is_tensor(value):
                        value.zero_()
            else:
                # Fresh moments and a fresh bias correction for the new block.
                optimizer.state.pop(param, None)

    def _relocalize(self, target: Target, step: int) -> None:
        module = target.module
        score = module.scorer.score()
        k_rows, k_cols = module.sub.shape
        total = float(score.sum())
        if total == 0 and target.expert is not None:  # an expert no token reached while it scored keeps its block
            module.stop_scoring()
            return
        rows, cols, mass = select_block(score, k_rows, k_cols, self.cfg.selection)
        if self.ctx.dist.world_size > 1:
            # Every rank scores the same all-reduced gradient and selects deterministically, so
            # this is a guard: should one rank differ, rank 0's block wins and the count says so.
            chosen = torch.cat([rows, cols])
            agreed = self.ctx.dist.broadcast_from_main(chosen.clone())
            if not torch.equal(agreed, chosen):
                self.rank_disagreements += 1
                rows, cols = agreed[:k_rows], agreed[k_rows:]
        overlap = block_overlap(module.rows, module.cols, rows, cols)
        module.move_block(rows, cols)
        module.stop_scoring()  # frees the EMAs
        self._log(target, step=step + 1, score_mass=mass / total if total > 0 else 0.0, overlap=overlap,
                  source="score")

    def _set_scoring(self, step: int) -> None:
        """Put exactly the slots that score during update `step` into scoring mode. A slot whose
        period ends after the run's last update would never re-localize: it does not score."""
        period = self.slot_schedule.period
        finishes = (step // period + 1) * period <= self.ctx.total_steps
        scoring = set(self.slot_schedule.scoring_slots(step)) if finishes else set()
        if scoring == self.scoring_slots:
            return
        cfg = self.cfg
        for t in self.targets:
            if t.slot not in scoring:
                t.module.stop_scoring()
            elif t.module.scorer is None:
                t.module.start_scoring(cfg.importance, cfg.beta1, cfg.beta2)
        self.scoring = [t for t in self.targets if t.module.scorer is not None]
        self.scoring_slots = scoring

    def _log(self, target: Target, *, step: int, score_mass: float, overlap: float, source: str) -> None:
        """One subnets.jsonl record. `step` is the update count from which the block trains; `score_mass`
        is the share of the score the block holds (0 for an initial block). Built only when someone
        listens: reading the indices back is a host sync."""
        if not self.ctx.records.listening:
            return
        module = target.module
        record = {
            "step": step,
            "layer": target.layer,
            "slot": target.slot,
            "module": target.key,
            "shape": [module.out_features, module.in_features],
            "rows": module.rows.tolist(),
            "cols": module.cols.tolist(),
            "score_mass": score_mass,
            "overlap_prev": overlap,
            "source": source,
        }
        if target.expert is not None:  # one (out, in) matrix of a 3-D expert parameter
            record["expert"] = target.expert
        self.ctx.records.write("subnets", record)

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What model.state_dict() (W, sub, R, C) and the optimizer do not hold."""
        scorers = {
            t.name: {key: value.clone() for key, value in t.module.scorer.state_dict().items()}
            for t in self.targets
            if t.module.scorer is not None
        }
        return {"next_step": self.next_step, "restarts": list(self.restarts), "scorers": scorers}

    def load_state_dict(self, state: dict) -> None:
        if len(state["restarts"]) != len(self.slots):
            saved = len(state["restarts"])
            raise ConfigError(f"run.resume: the checkpoint has {saved} LoSiA slots, this model and method config "
                              f"{len(self.slots)}")
        self.next_step = state["next_step"]
        self.restarts = list(state["restarts"])
        for t in self.targets:  # scoring restarts from zero EMAs, then takes the saved ones
            t.module.stop_scoring()
        self.scoring, self.scoring_slots = [], None
        self._set_scoring(self.next_step)
        active = {t.name: t.module.scorer for t in self.targets if t.module.scorer is not None}
        if set(active) != set(state["scorers"]):
            raise ConfigError("run.resume: the checkpoint's LoSiA scoring layers do not match its step")
        for name, scorer in active.items():
            scorer.load_state_dict(state["scorers"][name])

    # --- results ------------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self, model: nn.Module) -> None:
        if self.delta:  # write-through has written every block already
            for t in self.targets:
                t.module.write_through()

    @torch.no_grad()
    def export(self, model: nn.Module) -> nn.Module:
        """A plain model (nn.Linear / Conv1D again) that shares W, b and every other tensor with `model`.

        `model` is left as it was, so training can go on. Pass the unwrapped model (not DDP's wrapper).
        Sharded (FSDP) training saves from the gathered state dict instead (`save`), so the sharded
        module tree is returned as it is.
        """
        if self.delta:
            return model
        for t in self.targets:
            t.module.write_through()  # idempotent; W already holds `sub` after every on_step
        # Copy the module tree only: tensors and the wrappers themselves map to the originals.
        memo = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
        memo.update({id(t.module): t.module for t in self.targets})
        memo.update({id(wrapper): wrapper for wrapper in self.experts.values()})
        plain = copy.deepcopy(model, memo)
        if self.tied_hook is not None:  # the copy's embedding is a plain lookup again
            plain.get_input_embeddings()._forward_hooks.pop(self.tied_hook.id)
        for t in self.targets:
            if t.expert is None:
                plain.set_submodule(t.name, t.module.to_plain())
        for name, wrapper in self.experts.items():
            plain.set_submodule(name, wrapper.to_plain())
        return plain

    def save(self, exported: nn.Module, path, state_dict: dict | None = None) -> None:
        if state_dict is not None:  # gathered from shards: W holds the blocks (finalize); drop the rest
            wrapper_only = {f"{t.name}.{key}" for t in self.targets for key in ("sub", "rows", "cols")}
            state_dict = {key: value for key, value in state_dict.items() if key not in wrapper_only}
        super().save(exported, path, state_dict)

    def report_extras(self) -> dict:
        return {"relocalization_time_s": self.relocalization_timer.seconds}

    def describe(self) -> dict:
        info = super().describe()
        subnet = sum(t.module.sub.numel() for t in self.targets)
        ps = [t.p for t in self.targets]
        lora_params_per_rank = sum(t.module.out_features + t.module.in_features for t in self.targets)
        # Gradient accumulator and two EMAs, fp32, for what scores at once: one slot, or all (sync).
        slot_bytes = [3 * 4 * sum(t.module.weight.numel() for t in slot) for slot in self.slots]
        scoring_bytes = sum(slot_bytes) if self.slot_schedule.sync else max(slot_bytes)
        info.update(
            {
                "total_params": info["total_params"] - subnet,  # `sub` duplicates part of W
                "pro": self.cfg.use_pro,
                "subnet_params": subnet,
                "dense_extra_params": sum(p.numel() for p in self.extras),
                "matrices": len(self.targets),
                "slots": len(self.slots),
                "rank_factor": {"min": min(ps), "max": max(ps), "mean": sum(ps) / len(ps)},
                "lora_equiv_rank": subnet / lora_params_per_rank,
                "scoring_buffer_bytes": scoring_bytes,
                "subnet_rank_disagreements": self.rank_disagreements,
            }
        )
        return info

    def target_account(self) -> dict:
        trained = Counter()
        for t in self.targets:  # an expert parameter is one candidate: its experts' blocks summed
            trained[t.name if t.expert is None else t.key] += t.module.sub.numel()
        why = {"head": HEAD_WHY, "experts": self.experts_why or "MoE expert weights, not in method.target_modules"}
        info = account(self.candidates, dict(trained), why)
        if self.cfg.dense_extras != "none":
            info["note"] = f"plus dense {self.cfg.dense_extras} ({sum(p.numel() for p in self.extras):,} params)"
        return info
