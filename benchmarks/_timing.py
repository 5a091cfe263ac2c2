"""What the benchmark scripts share: waiting for the device, the base config to start from, and
the arguments that say which training step to run.

Imported by the scripts of this folder (which Python puts first on ``sys.path`` when one of them
runs); importing it also makes the repository's ``configs/`` importable.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from pathlib import Path

import torch

__all__ = ["add_step_arguments", "base_config", "open_device", "open_upstream", "sync"]

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


def add_step_arguments(
    parser: argparse.ArgumentParser, *, batch_size: int, loss: str | None = None
) -> None:
    """``--network --batch-size --num-classes --k --fp16 --device`` (and ``--loss``, defaulting
    to ``loss``, when given)."""
    parser.add_argument("--network", default="r18_lite")
    if loss is not None:
        parser.add_argument("--loss", default=loss, choices=("arcface", "otface"))
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--k", type=int, default=4, help="images per identity in a batch")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def open_upstream(parser: argparse.ArgumentParser, path: str | None):
    """arcface_torch's modules from the checkout at ``path`` (``_upstream.load_arcface_torch``),
    None without one; a bad checkout ends the script with the parser's error."""
    if not path:
        return None
    from _upstream import load_arcface_torch

    try:
        return load_arcface_torch(path)
    except (FileNotFoundError, ImportError) as err:
        parser.error(str(err))


def open_device(name: str, threads: int) -> tuple[torch.device, str]:
    """The device to time on, set up as the trainer does (cuDNN autotuning on CUDA), and its
    description for the output; ``threads`` CPU threads (0: torch's default)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        return device, torch.cuda.get_device_name(device)
    return device, f"CPU, {torch.get_num_threads()} thread(s)"
