"""Every random number generator that training draws from: seeded at the start of a run,
saved into and restored from a checkpoint, so that a killed-and-resumed run repeats the
uninterrupted one.

What draws random numbers, and how a resume recovers it:

* torch's CPU and CUDA generators (dropout, initialisation): saved here;
* NumPy's and Python's global generators (user code, third-party augmentations): saved here;
* the batch order and the random flips: pure functions of ``(seed, epoch, rank, batch)``
  in the samplers (:mod:`otface.data.sampler`), recovered from the saved epoch and batch;
  DataLoader workers therefore draw nothing that a resume has to restore;
* Partial FC's class-centre sampling: seeded from ``(seed, step, rank)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) the same way on every rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The state of torch (CPU and every CUDA device), NumPy's and Python's global RNGs."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any] | None) -> bool:
    """Restore what :func:`capture_rng_state` returned; ``False`` when ``state`` is ``None``
    (a checkpoint written by arcface_torch or an older otface)."""
    if not state:
        return False
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda[: torch.cuda.device_count()]])
    return True
