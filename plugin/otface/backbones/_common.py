"""Small helpers shared by the backbones."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

__all__ = ["cuda_autocast"]


def cuda_autocast(x: torch.Tensor, *, fp16: bool) -> ContextManager:
    """The mixed-precision context arcface_torch's backbones run their conv trunk in.

    On a CUDA tensor this is ``torch.autocast("cuda", enabled=fp16)`` — note that with
    ``fp16=False`` it *disables* an autocast region the caller may have opened, exactly as the
    reference backbones do. Elsewhere (CPU, meta) nothing is changed.

    Args:
        x: the input batch; only its device is read.
        fp16: whether the trunk runs under float16 autocast.
    """
    if x.is_cuda:
        return torch.autocast(device_type="cuda", dtype=torch.float16, enabled=fp16)
    return contextlib.nullcontext()
