"""When each layer scores and re-localizes, and the LR multiplier of its param group (docs/method.md 4, 5.4).

`step` everywhere is the number of optimizer updates already taken (0-based index of the current update),
the convention of `Method.lr_factors` and `Method.on_step`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from losia_cli.methods.base import WarmupCosine


def layer_index(module_name: str, slot_pattern: str) -> int | None:
    """The decoder-layer number in a qualified module name (first group of `slot_pattern`), if any."""
    match = re.search(slot_pattern, module_name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class SlotSchedule:
    """Time slots of T updates. async: slot g*(s) = floor(s/T) mod L scores during update s, and
    re-localizes after the last update of its slot. sync: every slot scores during cycle slot 0 and all
    re-localize together at its end."""

    num_slots: int
    period: int
    sync: bool = False

    def scoring_slots(self, step: int) -> list[int]:
        owner = (step // self.period) % self.num_slots
        if self.sync:
            return list(range(self.num_slots)) if owner == 0 else []
        return [owner]

    def relocalizing_slots(self, step: int) -> list[int]:
        """Slots that re-localize right after update `step`."""
        return self.scoring_slots(step) if (step + 1) % self.period == 0 else []


@dataclass(frozen=True)
class Rewarm:
    """LR multiplier of a subnet group: the global warmup+cosine times a linear ramp after each restart.

    `restart` is t_r, the update count at which the group's block last moved (None: never). The ramp
    min(1, (t - t_r)/T_w) is 0 on the first update with a new block and reaches the cosine curve itself
    after T_w updates. With `compat_reference` the reference's formula is used instead (docs/method.md 5.4): the ramp
    aims at c(t_r/(N-W)) and the LR jumps up to the cosine when it ends.
    """

    schedule: WarmupCosine
    length: int
    compat_reference: bool = False

    def factor(self, t: int, restart: int | None) -> float:
        if self.compat_reference:
            return self._reference_factor(t, 0 if restart is None else restart)
        base = self.schedule.factor(t)
        if restart is None or self.length == 0:
            return base
        return base * min(1.0, (t - restart) / self.length)

    def _reference_factor(self, t: int, restart: int) -> float:
        warmup = self.schedule.warmup_steps
        if t < warmup:
            return t / warmup
        decay_steps = max(1, self.schedule.total_steps - warmup)
        if self.length > 0 and t - restart < self.length:
            return (t - restart) / self.length * self.schedule.cosine(restart / decay_steps)
        return self.schedule.cosine((t - warmup) / decay_steps)
