"""Polynomial learning-rate decay with linear warm-up, stepped once per batch."""

from __future__ import annotations

import torch

__all__ = ["lr_factor", "build_lr_scheduler"]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, power: float = 1.0) -> float:
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


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, power: float = 1.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`; its ``state_dict`` resumes the schedule exactly."""

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, power=power)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
