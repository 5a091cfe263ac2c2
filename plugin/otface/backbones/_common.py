"""Small helpers shared by the backbones."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Union

import torch

__all__ = ["cuda_autocast", "use_channels_last"]

CHANNELS_LAST_CHOICES = ("auto", True, False)


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


def use_channels_last(setting: Union[str, bool], device: torch.device) -> bool:
    """Whether a backbone and its input batches run in ``torch.channels_last`` (NHWC).

    cuDNN's convolutions are NHWC-native on tensor-core GPUs; in NCHW every convolution pays
    for two layout transposes (measured 18.6% of an r100 step on an H200). A parameter's memory
    format is not part of the ``state_dict``'s keys, shapes or values, so checkpoints, ONNX
    export and arcface_torch interchange are unaffected.

    Args:
        setting: ``"auto"`` (on for CUDA devices, off elsewhere), ``True`` or ``False``.
        device: the device the backbone trains on.

    Raises:
        ValueError: ``setting`` is none of ``"auto"``, ``True``, ``False``.
    """
    if isinstance(setting, bool):
        return setting
    if setting == "auto":
        return torch.device(device).type == "cuda"
    raise ValueError(
        f"channels_last must be one of {', '.join(map(repr, CHANNELS_LAST_CHOICES))}; "
        f"got {setting!r}"
    )
