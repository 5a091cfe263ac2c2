"""Skipped steps that leave no trace: a snapshot of the backbone's buffers taken before the
forward, restored when the optimiser step is skipped, and a limit on consecutive skips.

A batch with a NaN image makes BatchNorm's forward write NaN into ``running_mean`` /
``running_var`` before any gradient exists to check. Skipping only the optimiser step would
keep the weights but still poison every buffer, and the saved model would score at chance.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "BufferSnapshot",
    "NonFiniteState",
    "SkipCounter",
    "TooManySkippedSteps",
    "first_nonfinite",
]


class TooManySkippedSteps(RuntimeError):
    """Training stopped: too many optimiser steps were skipped (in a row, or in all)."""


class NonFiniteState(RuntimeError):
    """A save was refused: the state to write holds NaN or Inf."""


def first_nonfinite(tensors) -> str | None:
    """The name of the first floating-point tensor of ``tensors`` (a mapping of names to
    tensors, nested mappings and lists allowed) that holds NaN or Inf; None if all are finite.
    Reads every tensor on the host: for saves, not for the step."""

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return prefix
            return None
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, (list, tuple)):
            items = enumerate(value)
        else:
            return None
        for key, item in items:
            found = walk(f"{prefix}.{key}" if prefix else str(key), item)
            if found is not None:
                return found
        return None

    return walk("", tensors)


class BufferSnapshot:
    """A copy of modules' floating-point and integer buffers, refreshed in place.

    ``take()`` copies every buffer into pre-allocated storage (one fused multi-tensor copy where
    torch has it; no allocation after the first call, no host sync); ``restore()`` copies
    them back. Parameters are not included: a skipped optimiser step does not change them.
    The trainer passes the backbone (BatchNorm statistics) and Partial FC (a margin head's
    running statistics).
    """

    def __init__(self, *modules: nn.Module) -> None:
        self._buffers = [b for module in modules for b in module.buffers() if b is not None]
        self._saved = [torch.empty_like(b) for b in self._buffers]
        self._floats = [b for b in self._buffers if b.is_floating_point()]

    def __len__(self) -> int:
        return len(self._buffers)

    def take(self) -> None:
        _copy_all(self._saved, self._buffers)

    def restore(self) -> None:
        _copy_all(self._buffers, self._saved)

    def finite(self) -> torch.Tensor | None:
        """A device bool: every floating-point buffer (BatchNorm's and the head's statistics) holds
        only finite values; None without such buffers. No host read: x * 0 is 0 for a finite
        x and NaN for Inf or NaN, whatever the magnitude, and one fused norm sums them."""
        if not self._floats:
            return None
        with torch.no_grad():
            zeros = torch._foreach_mul(self._floats, 0.0)
            return torch.isfinite(torch.stack(torch._foreach_norm(zeros))).all()


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if not dst:
        return
    with torch.no_grad():
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(dst, src)
        else:  # torch < 2.1
            for d, s in zip(dst, src):
                d.copy_(s)


class SkipCounter:
    """Counts skipped optimiser steps, in all and in a row.

    Args:
        max_consecutive: stop (raise :class:`TooManySkippedSteps`) when this many optimiser
            steps in a row were skipped; 0 never stops.
    """

    def __init__(self, *, max_consecutive: int) -> None:
        self.max_consecutive = int(max_consecutive)
        self.total = 0
        self.consecutive = 0

    def record(self, *, skipped: bool, global_step: int) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise TooManySkippedSteps(
                f"{self.consecutive} consecutive optimiser steps were skipped for a non-finite "
                f"loss or gradient (the last at global step {global_step}; "
                f"max_consecutive_skips = {self.max_consecutive}); stopping. Check the data "
                "for NaN/Inf images and lower the learning rate"
            )
