"""Face-recognition backbones by name, as arcface_torch's ``get_model``.

``get_model("r50", dropout=0.0, fp16=False, num_features=512)`` builds a network whose
``state_dict`` keys, order and shapes equal arcface_torch's network of the same name. Each
network class names the module whose output is its last conv feature map in a ``feature_layer``
class attribute (``"bn2"`` for IResNet, ``"conv_sep"`` for MobileFaceNet), for feature hooks.

``set_fused_bn_prelu(model, "auto")`` runs the BatchNorm + PReLU inside every IResNet block as
one fused Triton op in training mode (:func:`bn_prelu`); the ``state_dict`` is unchanged.

``use_channels_last(setting, device)`` decides the memory layout a trainer puts a network and its
input in (``config.channels_last``); the layout never changes a ``state_dict``.

Networks can be built without allocating memory::

    with torch.device("meta"):
        model = get_model("r100")
"""

from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn

from otface.backbones._common import use_channels_last
from otface.backbones.fused_bn_prelu import bn_prelu, set_fused_bn_prelu
from otface.backbones.iresnet import IBasicBlock, IResNet
from otface.backbones.mobilefacenet import MobileFaceNet

__all__ = [
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "bn_prelu",
    "get_model",
    "list_models",
    "set_fused_bn_prelu",
    "use_channels_last",
]

_IRESNET_LAYERS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}


def _iresnet(layers):
    def build(*, dropout: float = 0.0, fp16: bool = False, num_features: int = 512) -> IResNet:
        return IResNet(layers, dropout=dropout, fp16=fp16, num_features=num_features)

    return build


def _mbf(*, dropout: float = 0.0, fp16: bool = False, num_features: int = 512) -> MobileFaceNet:
    if dropout:
        raise ValueError(f"network 'mbf' has no dropout layer; got dropout={dropout}")
    return MobileFaceNet(num_features=num_features, fp16=fp16)


def _r18_lite(*, dropout: float = 0.0, fp16: bool = False, num_features: int = 512) -> IResNet:
    # A CPU demo network, not compatible with any upstream one: one IResNet block per stage,
    # narrow stages, and the resolution halved early (stride-2 stem, stride-1 last stage) so a
    # 112×112 batch trains fast on a couple of cores; bn2 still gives a 128×7×7 map.
    return IResNet(
        (1, 1, 1, 1),
        dropout=dropout,
        fp16=fp16,
        num_features=num_features,
        widths=(16, 32, 64, 128),
        stem_stride=2,
        stage_strides=(2, 2, 2, 1),
    )


_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    **{name: _iresnet(layers) for name, layers in _IRESNET_LAYERS.items()},
    "mbf": _mbf,
    "r18_lite": _r18_lite,
}


def list_models() -> List[str]:
    """Names accepted by :func:`get_model`, in registration order."""
    return list(_BUILDERS)


def get_model(
    name: str, *, dropout: float = 0.0, fp16: bool = False, num_features: int = 512
) -> nn.Module:
    """Build the backbone called ``name``.

    Args:
        name: one of :func:`list_models` — ``r18 r34 r50 r100 r200`` (IResNet), ``mbf``
            (MobileFaceNet), ``r18_lite`` (a small CPU demo IResNet).
        dropout: dropout probability before the FC layer (IResNet only; must be 0 for mbf).
        fp16: run the conv trunk under float16 autocast on CUDA inputs.
        num_features: embedding size.

    Returns:
        An ``nn.Module`` mapping ``(N, 3, 112, 112)`` images to ``(N, num_features)``
        embeddings; built on the current default device (``with torch.device("meta")`` works).

    Raises:
        ValueError: unknown ``name``, or a bad ``dropout``.
    """
    try:
        builder = _BUILDERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown network {name!r}; valid: {', '.join(_BUILDERS)}") from None
    return builder(dropout=dropout, fp16=fp16, num_features=num_features)
