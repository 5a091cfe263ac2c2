"""Capture of a backbone's high-level feature map with a forward hook.

:class:`FeatureCapture` registers a forward hook on one module of the backbone and keeps its
latest output (with its autograd history). A hook is neither a parameter nor a buffer, so the
backbone's ``state_dict`` and its ONNX export are unchanged; :meth:`FeatureCapture.remove`
leaves no hook behind.

The captured map keeps the backbone's memory layout: under ``channels_last`` it is an
``(N, C, H, W)`` tensor with NHWC strides, the same values as in NCHW. Readers must use
layout-independent ops (``flatten``, ``reshape``, ``permute``), never ``.view`` on the
channel-first order, which fails (or would need a copy) on NHWC strides.

A Vision Transformer's feature layer (``"patch_tokens"``) gives ``(N, T, D)`` tokens instead.
In training with token masking some of them are the learned mask token, not a patch; the
backbone says which in ``last_token_mask`` (``(N, T)`` bool, True = real patch), and
:meth:`FeatureCapture.point_mask` hands it on so that the OT term gives those points no mass.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from otface.registry import HOOKS

__all__ = ["POINT_MASK_ATTR", "FeatureCapture", "resolve_feature_layer"]

POINT_MASK_ATTR = "last_token_mask"
"""Backbone attribute that, after a forward, marks which captured points are real (True) and
which are fillers to leave out (a ViT's mask tokens), or is None when all are real."""


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel keep the user's model in ``.module``.
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _candidates(model: nn.Module) -> List[str]:
    kinds = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
    return [name for name, mod in model.named_modules() if name and isinstance(mod, kinds)]


def resolve_feature_layer(model: nn.Module, layer: str = "auto") -> str:
    """Name of the module whose output is the high-level feature map.

    Args:
        model: the backbone, possibly wrapped in DDP (names resolve on ``.module``).
        layer: ``"auto"`` (the class attribute ``feature_layer`` when present, else ``"bn2"``
            when the backbone has one) or an explicit module name (``"layer4.2.conv2"``).

    Returns:
        A name valid in ``_unwrap(model).named_modules()``.
    """
    model = _unwrap(model)
    modules = dict(model.named_modules())
    if layer == "auto":
        name = getattr(type(model), "feature_layer", None)
        if name is None and "bn2" in modules:
            name = "bn2"
        if name is None:
            cands = _candidates(model)
            raise ValueError(
                f"cannot pick the feature layer of {type(model).__name__} automatically: it has "
                f"no 'feature_layer' attribute and no 'bn2' module; set otface.layer to one of "
                f"its conv/norm modules: {', '.join(cands[-12:]) or '(none found)'}"
            )
    else:
        name = layer
    if name not in modules or not name:
        cands = _candidates(model)
        raise ValueError(
            f"feature layer {name!r} is not a module of {type(model).__name__}; conv/norm "
            f"modules: {', '.join(cands[-12:]) or '(none found)'}"
        )
    return name


class FeatureCapture:
    """Forward hook keeping the latest output of one backbone module.

    Usable as a context manager (``with FeatureCapture(backbone) as cap: ...``), which removes
    the hook on exit. With reentrant gradient checkpointing the first forward of a checkpointed
    block runs without autograd, so the captured map carries no gradient; non-reentrant
    checkpointing (``use_reentrant=False``) keeps it differentiable.

    Args:
        backbone: the model (plain or DDP-wrapped).
        layer: ``"auto"`` or a module name, see :func:`resolve_feature_layer`.
    """

    def __init__(self, backbone: nn.Module, layer: str = "auto") -> None:
        self.layer = resolve_feature_layer(backbone, layer)
        self._model = _unwrap(backbone)
        module = dict(self._model.named_modules())[self.layer]
        self.features: Optional[torch.Tensor] = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output) -> None:
        if isinstance(output, (tuple, list)):
            output = output[0]
        self.features = output

    def pop(self) -> Optional[torch.Tensor]:
        """The latest captured map, forgetting it (so it does not outlive the step)."""
        features, self.features = self.features, None
        return features

    def point_mask(self, features: torch.Tensor) -> Optional[torch.Tensor]:
        """Which of ``features``' points are real, from the backbone's latest forward.

        Args:
            features: the map :meth:`pop` returned for that forward.

        Returns:
            The backbone's :data:`POINT_MASK_ATTR` (``(B, T)`` bool, True = real point) when it
            marks these features, i.e. when they are ``(B, T, D)`` tokens of the same ``B`` and
            ``T`` (a ViT's ``patch_tokens``); None otherwise: every point is real (conv maps,
            eval mode, no masking, or a hooked block whose output holds only the kept tokens).
        """
        mask = getattr(self._model, POINT_MASK_ATTR, None)
        if mask is None or features.dim() != 3 or tuple(mask.shape) != tuple(features.shape[:2]):
            return None
        return mask

    def remove(self) -> None:
        """Remove the hook (idempotent) and drop the captured map."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.features = None

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@HOOKS.register("hard_triplet")
def _build_hard_triplet(backbone: nn.Module, *, layer: str = "auto") -> FeatureCapture:
    """The feature hook used by the hard-triplet OT loss."""
    return FeatureCapture(backbone, layer=layer)
