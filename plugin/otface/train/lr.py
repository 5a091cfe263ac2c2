"""Polynomial learning-rate decay with linear warm-up, stepped once per batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ScheduleMap", "build_lr_scheduler", "lr_factor"]


def lr_factor(step: float, *, warmup_steps: int, total_steps: int, power: float = 1.0) -> float:
    """Multiplier of the base learning rate for the batch after ``step`` finished batches.

    Linear warm-up ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, then
    ``(1 - (step - warmup_steps) / (total_steps - warmup_steps)) ** power``, reaching 0 at
    ``total_steps`` (arcface_torch's PolynomialLRWarmup, without its first-step quirk of using the
    full rate before warm-up starts).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(step, total_steps) - warmup_steps
    return max(0.0, 1.0 - progress / (total_steps - warmup_steps)) ** power


@dataclass(frozen=True)
class ScheduleMap:
    """Where a run's global step sits on its learning-rate schedule.

    The schedule (``warmup_steps``, ``total_steps``) is the one of the run's first world size.
    A resume with another global batch re-anchors it: from ``anchor_step`` on, each step moves
    ``rate`` schedule steps, so the learning rate is unchanged at the resumed step and reaches
    zero at the end of the last epoch. Without a re-anchoring the position is the step itself.
    """

    warmup_steps: int
    total_steps: int
    anchor_step: int = 0
    anchor_position: float = 0.0
    rate: float = 1.0

    def position(self, step: int) -> float:
        """Schedule step of global step ``step``."""
        if self.is_identity:
            return step
        return self.anchor_position + (step - self.anchor_step) * self.rate

    def end_step(self) -> int:
        """Global step at which the schedule reaches ``total_steps``."""
        return self.anchor_step + round((self.total_steps - self.anchor_position) / self.rate)

    def reanchored(self, step: int, remaining_steps: int) -> ScheduleMap:
        """The map that keeps the position of ``step`` and reaches the end after
        ``remaining_steps`` more steps."""
        here = float(self.position(step))
        left = self.total_steps - here
        rate = left / remaining_steps if remaining_steps > 0 and left > 0 else 1.0
        return ScheduleMap(self.warmup_steps, self.total_steps, step, here, rate)

    @property
    def is_identity(self) -> bool:
        return self.anchor_step == 0 and self.anchor_position == 0.0 and self.rate == 1.0

    def anchors(self) -> dict[str, Any]:
        """The re-anchoring, for a checkpoint (the schedule itself follows the config)."""
        return {
            "anchor_step": self.anchor_step,
            "anchor_position": self.anchor_position,
            "rate": self.rate,
        }


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    power: float = 1.0,
    schedule: ScheduleMap | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`; its ``state_dict`` resumes the schedule exactly.

    ``schedule`` maps global steps to schedule steps (default: the identity on a schedule of
    ``warmup_steps`` and ``total_steps``, which it then replaces).
    """
    if schedule is None:
        schedule = ScheduleMap(warmup_steps, total_steps)

    def factor(step: int) -> float:
        return lr_factor(
            schedule.position(step),
            warmup_steps=schedule.warmup_steps,
            total_steps=schedule.total_steps,
            power=power,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
