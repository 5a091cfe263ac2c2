"""MobileFaceNet face backbone.

Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification on Mobile
Devices" (CCBR 2018): a 3×3 stride-2 stem, a grouped 3×3 conv, inverted-residual bottlenecks
(``1×1 expand → grouped 3×3 → 1×1 linear projection``) with identity shortcuts inside each
stage, a 1×1 conv to 512 channels, and a global depthwise conv (GDC) head
``depthwise 7×7 → BN → flatten → linear → BN1d``. This is the width-×2 variant ("mbf") trained
by arcface_torch.

Parameter names, their order and shapes equal arcface_torch's, so its ``model.pt`` files load
with ``strict=True`` and give the same embeddings.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from otface.backbones._common import cuda_autocast

__all__ = ["MobileFaceNet"]

_Pair = Tuple[int, int]


class _ConvUnit(nn.Module):
    """``conv → BN`` and, unless ``linear``, ``→ PReLU``; kept under a ``layers`` attribute."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        kernel: _Pair = (1, 1),
        stride: _Pair = (1, 1),
        padding: _Pair = (0, 0),
        groups: int = 1,
        linear: bool = False,
    ) -> None:
        super().__init__()
        parts = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if not linear:
            parts.append(nn.PReLU(out_ch))
        self.layers = nn.Sequential(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _Bottleneck(nn.Module):
    """Inverted residual: 1×1 to ``hidden`` channels, depthwise 3×3, 1×1 linear projection.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        hidden: expanded channels (also the group count of the 3×3 conv: it is depthwise).
        stride: stride of the 3×3 conv.
        residual: add the input to the output (needs ``stride == 1`` and ``in_ch == out_ch``).
    """

    def __init__(
        self, in_ch: int, out_ch: int, *, hidden: int, stride: int, residual: bool
    ) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            _ConvUnit(in_ch, hidden),
            _ConvUnit(
                hidden,
                hidden,
                kernel=(3, 3),
                stride=(stride, stride),
                padding=(1, 1),
                groups=hidden,
            ),
            _ConvUnit(hidden, out_ch, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class _Stage(nn.Module):
    """``num_blocks`` stride-1 residual bottlenecks at ``channels`` channels."""

    def __init__(self, channels: int, *, num_blocks: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(
                _Bottleneck(channels, channels, hidden=hidden, stride=1, residual=True)
                for _ in range(num_blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _GDCHead(nn.Module):
    """Global depthwise conv head: ``(N, 512, 7, 7) → (N, num_features)``."""

    def __init__(self, num_features: int, *, channels: int = 512) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            _ConvUnit(channels, channels, kernel=(7, 7), groups=channels, linear=True),
            nn.Flatten(),
            nn.Linear(channels, num_features, bias=False),
            nn.BatchNorm1d(num_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet for 112×112 aligned faces.

    Args:
        num_features: embedding size.
        fp16: run the trunk (up to, not including, ``conv_sep``) under float16 autocast when
            the input is on CUDA.
        blocks: residual bottlenecks in each of the four stages; the first entry 1 means a
            single grouped 3×3 conv instead of a stage.
        scale: width multiplier (2 for "mbf").

    Shapes:
        input ``(N, 3, 112, 112)`` → ``conv_sep`` output ``(N, 512, 7, 7)`` → embedding
        ``(N, num_features)``.
    """

    feature_layer = "conv_sep"

    def __init__(
        self,
        *,
        num_features: int = 512,
        fp16: bool = False,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be four positive counts; got {tuple(blocks)}")
        self.fp16 = fp16
        c1, c2 = 64 * scale, 128 * scale
        stem = _ConvUnit(3, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1))
        if blocks[0] == 1:
            # Grouped (64 groups), not depthwise, in the reference network.
            first = _ConvUnit(c1, c1, kernel=(3, 3), padding=(1, 1), groups=64)
        else:
            first = _Stage(c1, num_blocks=blocks[0], hidden=128)
        self.layers = nn.ModuleList(
            [
                stem,
                first,
                _Bottleneck(c1, c1, hidden=128, stride=2, residual=False),
                _Stage(c1, num_blocks=blocks[1], hidden=128),
                _Bottleneck(c1, c2, hidden=256, stride=2, residual=False),
                _Stage(c2, num_blocks=blocks[2], hidden=256),
                _Bottleneck(c2, c2, hidden=512, stride=2, residual=False),
                _Stage(c2, num_blocks=blocks[3], hidden=256),
            ]
        )
        self.conv_sep = _ConvUnit(c2, 512)
        self.features = _GDCHead(num_features)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 112, 112)`` images → ``(N, num_features)`` embeddings (not normalised)."""
        with cuda_autocast(x, fp16=self.fp16):
            for layer in self.layers:
                x = layer(x)
        x = self.conv_sep(x.float() if self.fp16 else x)
        return self.features(x)
