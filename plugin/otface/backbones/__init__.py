"""Face-recognition backbones by name, as arcface_torch's ``get_model``.

``get_model("r50", dropout=0.0, fp16=False, num_features=512)`` builds a network whose
``state_dict`` keys, order and shapes equal arcface_torch's network of the same name (IResNets
``r18``…``r2060``, MobileFaceNets ``mbf`` and ``mbf_large``, Vision Transformers ``vit_*``).
Each network class names the module whose output is its last feature map in a
``feature_layer`` class attribute, for feature hooks: ``"bn2"`` for IResNet and
``"conv_sep"`` for MobileFaceNet (``(N, C, 7, 7)`` maps), ``"patch_tokens"`` for
VisionTransformer (``(N, 144, dim)`` tokens; in training mode with token masking,
``model.last_token_mask`` says which of them are real patches, see :class:`VisionTransformer`).

``set_fused_bn_prelu(model, "auto")`` runs the BatchNorm + PReLU inside every IResNet block as
one fused Triton op in training mode (:func:`bn_prelu`); the ``state_dict`` is unchanged.

``use_channels_last(setting, device)`` decides the memory layout a trainer puts a network and its
input in (``config.channels_last``); the layout never changes a ``state_dict``.

Networks can be built without allocating memory::

    with torch.device("meta"):
        model = get_model("r100")
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Sequence

from torch import nn

from otface.backbones._common import use_channels_last
from otface.backbones.fused_bn_prelu import bn_prelu, set_fused_bn_prelu
from otface.backbones.iresnet import IBasicBlock, IResNet
from otface.backbones.mobilefacenet import MobileFaceNet
from otface.backbones.vit import VisionTransformer

__all__ = [
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "VisionTransformer",
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


# IResNet-2060 checkpoints its two long stages in training, as arcface_torch's: (3, 128, 896, 3)
# blocks run as (-, 20, 100, -) segments.
_R2060_LAYERS = (3, 128, 896, 3)
_R2060_CHECKPOINT_SEGMENTS = (0, 20, 100, 0)


class _ViTSize(NamedTuple):
    embed_dim: int
    depth: int
    drop_path_rate: float
    mask_ratio: float
    checkpointing: bool


# All at 112 px, patch 9 (144 tokens), 8 heads, LayerNorm, MLP ratio 4, as arcface_torch's.
_VIT_SIZES = {
    "vit_t": _ViTSize(256, 12, 0.1, 0.1, False),
    "vit_t_dp005_mask0": _ViTSize(256, 12, 0.05, 0.0, False),
    "vit_s": _ViTSize(512, 12, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": _ViTSize(512, 12, 0.05, 0.0, False),
    "vit_b": _ViTSize(512, 24, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": _ViTSize(512, 24, 0.05, 0.05, True),
    "vit_l_dp005_mask_005": _ViTSize(768, 24, 0.05, 0.05, True),
    "vit_h": _ViTSize(1024, 48, 0.1, 0.0, True),
}


def _no_dropout(name: str, dropout: float) -> None:
    if dropout:
        raise ValueError(f"network {name!r} has no dropout layer; got dropout={dropout}")


def _iresnet(layers, checkpoint_segments: Sequence[int] = (0, 0, 0, 0)):
    def build(*, dropout: float = 0.0, fp16: bool = False, num_features: int = 512) -> IResNet:
        return IResNet(
            layers,
            dropout=dropout,
            fp16=fp16,
            num_features=num_features,
            checkpoint_segments=checkpoint_segments,
        )

    return build


def _mobilefacenet(name: str, blocks: Sequence[int], scale: int):
    def build(
        *, dropout: float = 0.0, fp16: bool = False, num_features: int = 512
    ) -> MobileFaceNet:
        _no_dropout(name, dropout)
        return MobileFaceNet(num_features=num_features, fp16=fp16, blocks=blocks, scale=scale)

    return build


def _vit(name: str, size: _ViTSize):
    def build(
        *, dropout: float = 0.0, fp16: bool = False, num_features: int = 512
    ) -> VisionTransformer:
        _no_dropout(name, dropout)
        return VisionTransformer(
            num_features=num_features,
            fp16=fp16,
            img_size=112,
            patch_size=9,
            num_heads=8,
            **size._asdict(),
        )

    return build


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


def _vit_t_lite(
    *, dropout: float = 0.0, fp16: bool = False, num_features: int = 512
) -> VisionTransformer:
    # A CPU demo network, not compatible with any upstream one: vit_t's 112 px input, 9 px
    # patches (144 tokens), drop-path 0.1 and token masking 0.1, but 64-wide tokens, 2 blocks and
    # 4 heads, so a demo batch trains on a couple of cores; patch_tokens gives (N, 144, 64).
    _no_dropout("vit_t_lite", dropout)
    return VisionTransformer(
        num_features=num_features,
        fp16=fp16,
        img_size=112,
        patch_size=9,
        embed_dim=64,
        depth=2,
        num_heads=4,
        drop_path_rate=0.1,
        mask_ratio=0.1,
    )


_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    **{name: _iresnet(layers) for name, layers in _IRESNET_LAYERS.items()},
    "r2060": _iresnet(_R2060_LAYERS, _R2060_CHECKPOINT_SEGMENTS),
    "mbf": _mobilefacenet("mbf", (1, 4, 6, 2), 2),
    "mbf_large": _mobilefacenet("mbf_large", (2, 8, 12, 4), 4),
    **{name: _vit(name, size) for name, size in _VIT_SIZES.items()},
    "r18_lite": _r18_lite,
    "vit_t_lite": _vit_t_lite,
}


def list_models() -> List[str]:
    """Names accepted by :func:`get_model`, in registration order."""
    return list(_BUILDERS)


def get_model(
    name: str, *, dropout: float = 0.0, fp16: bool = False, num_features: int = 512
) -> nn.Module:
    """Build the backbone called ``name``.

    Args:
        name: one of :func:`list_models` — ``r18 r34 r50 r100 r200 r2060`` (IResNet; r2060
            checkpoints activations in training), ``mbf mbf_large`` (MobileFaceNet),
            ``vit_t vit_t_dp005_mask0 vit_s vit_s_dp005_mask_0 vit_b vit_b_dp005_mask_005
            vit_l_dp005_mask_005 vit_h`` (VisionTransformer, 112 px, patch 9, 8 heads; the
            name gives the width and depth — t: 256×12, s: 512×12, b: 512×24, l: 768×24,
            h: 1024×48 — and the suffix the drop-path rate and training-time token-mask
            ratio, 0.1 and 0.1 without one, except vit_h: 0.1 and 0; b, l and h checkpoint
            activations in training), ``r18_lite`` and ``vit_t_lite`` (small CPU demo networks,
            an IResNet and a ViT of 64-wide tokens and 2 blocks; neither matches an upstream
            network).
        dropout: dropout probability before the FC layer (IResNet only; must be 0 for the
            MobileFaceNets and ViTs).
        fp16: run the trunk (conv stages, or patch embedding and transformer blocks) under
            float16 autocast on CUDA inputs.
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
