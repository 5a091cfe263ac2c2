"""What the benchmark scripts share: waiting for the device, and the base config to start from.

Imported by the scripts of this folder (which Python puts first on ``sys.path`` when one of them
runs); importing it also makes the repository's ``configs/`` importable.
"""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path

import torch

__all__ = ["base_config", "sync"]

_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)  # configs/ is a folder of the repository, not of the package


def sync(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a no-op off CUDA), so a clock reading after it
    covers that work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def base_config():
    """A fresh copy of ``configs/base.py``'s config (arcface_torch's defaults and ours)."""
    return copy.deepcopy(importlib.import_module("configs.base").config)
