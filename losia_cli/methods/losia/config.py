"""Configuration of the LoSiA / LoSiA-Pro method (the `method` group of a recipe).

Defaults follow the reference scripts (docs/method.md, sections 3-5 and 7); the `compat_*` flags switch the
reference's quirks back on (docs/method.md 5.2-5.4 and 10).
"""

from __future__ import annotations

import re
from typing import Literal

from losia_cli.methods.base import check, method_config


@method_config
class LosiaConfig:
    name: Literal["losia", "losia_pro"] = "losia_pro"
    """Method name; `losia` is the dense-autograd reference, `losia_pro` the compact autograd function."""

    pro: bool | None = None
    """Use the compact (Pro) autograd function; None means `name == "losia_pro"`."""

    target_modules: list[str] | str | None = None
    """Linears to subnet-train. null: every linear map inside the decoder blocks (fused qkv/gate_up and
    GPT-2's Conv1D included; not MoE routers or the output head) and the 3-D expert parameters of a
    mixture-of-experts block, a block per expert. A list matches a module name (or an expert parameter,
    e.g. experts.down_proj) or its dotted suffix (like PEFT); a str is a regex that must match the whole
    qualified name; "all-linear" is every nn.Linear/Conv1D except the output head."""

    rank_factor: float = 0.125
    """p: the block keeps floor(p*m) rows and floor(p*n) columns of an m x n weight (at least 1 each)."""

    lora_rank: int | None = None
    """When set, p is chosen per matrix as sqrt(r(m+n)/(mn)) so the block has LoRA-rank-r's parameter
    count (docs/method.md 3.2); `rank_factor` is then ignored."""

    period: int = 50
    """T: optimizer steps per time slot; each slot one layer scores, then re-localizes."""

    rewarm_steps: int | None = None
    """T_w: length of the LR ramp after a re-localization; None means T, 0 disables the rewarm."""

    schedule: Literal["async", "sync"] = "async"
    """async: layers take turns scoring (the paper's default); sync: all layers score in slot 0 of each
    cycle and re-localize together (the ablation)."""

    importance: Literal["param_mix", "param_first", "param_second"] = "param_mix"
    """Sensitivity I_t: |WG - (WG)^2/2|, |WG| or (WG)^2 (docs/method.md 3.3)."""

    beta1: float = 0.85
    """EMA factor of the sensitivity average I-bar."""

    beta2: float = 0.85
    """EMA factor of the uncertainty average U-bar."""

    selection: Literal["best", "independent", "rows_first", "cols_first"] = "best"
    """Greedy block choice from the score S; "best" takes the candidate with the largest block mass."""

    init: Literal["random", "magnitude"] = "random"
    """Initial block: random rows/cols (seeded from the run seed) or top |W| row/column sums."""

    dense_extras: Literal["none", "norms", "all"] = "none"
    """What else trains with plain dense AdamW: nothing (pure PEFT), the norm weights, or every
    remaining parameter (embeddings, norms, biases, an un-subnetted lm_head: the reference)."""

    lm_head_rows: float = 0.0
    """p_out: when > 0 the output head is subnet-trained on floor(p_out*V) vocabulary rows and all
    hidden columns, as slot 0 (decoder layers shift by one, docs/method.md 3.6)."""

    slot_pattern: str | None = None
    """null: a target's decoder-layer index is the index of the decoder block it sits in; else a regex whose
    first group, searched in a module's qualified name, is that index."""

    compat_reference_schedule: bool = False
    """Reproduce the reference's rewarm formula, including the LR jump at the end of a rewarm (docs/method.md 5.4)."""

    compat_keep_step_counter: bool = False
    """At a re-localization keep the optimizer's step counter (only zero the moments), as the reference
    does; this switches Adam's bias correction off after the first reset (docs/method.md 5.3)."""

    compat_eps: bool = False
    """Give the subnet groups the reference's AdamW eps: 1e-6 added to sqrt(v) before the bias
    correction (HF style; torch adds eps after it), docs/method.md 5.2. Weight decay still comes before the update
    (torch) rather than after (reference); the reference scripts use none."""

    fp32_sub: bool = True
    """Keep the trainable block `sub` in fp32 (a master copy) even when the model weights are bf16 (fp64
    weights keep an fp64 block)."""

    def __post_init__(self):
        check(0.0 < self.rank_factor <= 1.0, "rank_factor", "must be in (0, 1]", self.rank_factor)
        check(self.lora_rank is None or self.lora_rank > 0, "lora_rank", "must be > 0", self.lora_rank)
        check(self.period >= 1, "period", "must be >= 1", self.period)
        check(self.rewarm_steps is None or self.rewarm_steps >= 0, "rewarm_steps", "must be >= 0", self.rewarm_steps)
        for key in ("beta1", "beta2"):
            check(0.0 <= getattr(self, key) < 1.0, key, "must be in [0, 1)", getattr(self, key))
        check(0.0 <= self.lm_head_rows <= 1.0, "lm_head_rows", "must be in [0, 1]", self.lm_head_rows)
        if self.slot_pattern is not None:
            try:
                groups = re.compile(self.slot_pattern).groups
            except re.error as e:
                raise ValueError(f"method.slot_pattern: not a regex: {e}") from None
            check(groups >= 1, "slot_pattern", "needs a capture group for the layer index", self.slot_pattern)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"method.target_modules: not a regex: {e}") from None
        check(self.target_modules != [], "target_modules", "is empty", self.target_modules)

    @property
    def use_pro(self) -> bool:
        return self.name == "losia_pro" if self.pro is None else self.pro

    @property
    def rewarm_length(self) -> int:
        return self.period if self.rewarm_steps is None else self.rewarm_steps
