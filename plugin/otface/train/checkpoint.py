"""Atomic checkpoint files, in arcface_torch's layout.

``model.pt`` is the backbone's ``state_dict``. ``checkpoint_gpu_{rank}.pt`` holds ``epoch``,
``global_step``, ``state_dict_backbone``, ``state_dict_softmax_fc``, ``state_optimizer``,
``state_lr_scheduler`` (upstream's keys) plus ``epoch_step`` (batches done in ``epoch``) and
``state_grad_scaler`` (ours). Every file is written to a temporary name in the same folder and
renamed over the old one, so a kill during a save never leaves a truncated checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

__all__ = ["atomic_save", "load_checkpoint", "checkpoint_path", "model_path", "CheckpointError"]

UPSTREAM_KEYS = (
    "epoch",
    "global_step",
    "state_dict_backbone",
    "state_dict_softmax_fc",
    "state_optimizer",
    "state_lr_scheduler",
)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or cannot be used; the message names the file."""


def checkpoint_path(output: str, rank: int) -> str:
    return os.path.join(output, f"checkpoint_gpu_{rank}.pt")


def model_path(output: str) -> str:
    return os.path.join(output, "model.pt")


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_checkpoint(path: str, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a ``checkpoint_gpu_{rank}.pt``; errors name the file and what is wrong."""
    if not os.path.isfile(path):
        raise CheckpointError(
            f"resume = True but {path} does not exist; checkpoints are written when "
            "save_all_states = True (at the end of each epoch, and every save_every_steps steps)"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err
    missing = [k for k in UPSTREAM_KEYS if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {', '.join(missing)})")
    return ckpt
