"""Improved ResNet (IResNet) face backbones.

The architecture is the one of Duta et al., "Improved Residual Networks for Image and Video
Recognition" (ICPR 2020), as used for face recognition by ArcFace (Deng et al., CVPR 2019):
pre-activation residual blocks ``BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN`` plus a
projection shortcut ``conv1×1(stride) → BN`` where the shape changes, a stride-1 3×3 stem, and
an "output layer E" head ``BN2d → dropout → flatten → FC → BN1d``.

Parameter names, their order and shapes equal arcface_torch's, so its ``model.pt`` files load
with ``strict=True`` and give the same embeddings.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from otface.backbones._common import cuda_autocast
from otface.backbones.fused_bn_prelu import bn_prelu

__all__ = ["IBasicBlock", "IResNet"]

# Spatial size of the last feature map for a 112×112 input (four stride-2 stages).
_FEATURE_HW = 7


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation basic block; the stride sits on the second convolution.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: stride of the second 3×3 convolution and of the shortcut.

    Attributes:
        fused_bn_prelu: ``"off"`` (default): ``prelu(bn2(·))`` by the modules; otherwise the
            ``kernel`` of :func:`~otface.backbones.fused_bn_prelu.bn_prelu`, which computes
            the same in training mode with fused kernels (eval mode always runs the modules).
            Set it with :func:`~otface.backbones.fused_bn_prelu.set_fused_bn_prelu`; it is
            not part of the ``state_dict``.
    """

    fused_bn_prelu: str = "off"

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1) -> None:
        super().__init__()
        # Registration order fixes the state_dict order; keep it.
        self.bn1 = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_ch, H, W) → (N, out_ch, H/stride, W/stride)``."""
        out = self.conv1(self.bn1(x))
        if self.fused_bn_prelu == "off" or not self.training:
            out = self.prelu(self.bn2(out))
        else:
            out = bn_prelu(out, self.bn2, self.prelu, kernel=self.fused_bn_prelu)
        out = self.bn3(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet trunk and embedding head for 112×112 aligned faces.

    Args:
        layers: number of blocks in each of the four stages.
        dropout: dropout probability on the flattened ``bn2`` features.
        num_features: embedding size.
        fp16: run the conv trunk under float16 autocast when the input is on CUDA; the FC
            and the final BatchNorm1d always run in float32.
        widths: channels of the four stages (the stem has ``widths[0]``); the reference
            networks use ``(64, 128, 256, 512)``.
        stem_stride: stride of the stem convolution (1 in the reference networks).
        stage_strides: stride of each stage (2 in the reference networks). The product of
            all strides must be 16 so that a 112×112 input gives a 7×7 ``bn2`` map.
        checkpoint_segments: activation checkpointing per stage, in training mode only: a
            positive entry runs that stage as so many checkpointed segments
            (:func:`torch.utils.checkpoint.checkpoint_sequential`, non-reentrant), trading
            recomputation for memory; 0 runs it plainly. arcface_torch's r2060 uses
            ``(0, 20, 100, 0)``. Outputs and gradients are those of the plain run; as there,
            the recomputation updates the BatchNorm running statistics of a checkpointed
            stage a second time each step.

    Shapes:
        input ``(N, 3, 112, 112)`` → ``bn2`` output ``(N, widths[-1], 7, 7)`` → embedding
        ``(N, num_features)`` (the output of ``features``, a BatchNorm1d with frozen unit
        weight).

    Attributes:
        fused_bn_prelu: as :attr:`IBasicBlock.fused_bn_prelu`, for the stem's ``bn1`` +
            ``prelu`` (the largest activation of the network, ``widths[0]`` channels at
            112×112 with the reference stride).
    """

    feature_layer = "bn2"
    fused_bn_prelu: str = "off"

    def __init__(
        self,
        layers: Sequence[int],
        *,
        dropout: float = 0.0,
        num_features: int = 512,
        fp16: bool = False,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_stride: int = 1,
        stage_strides: Sequence[int] = (2, 2, 2, 2),
        checkpoint_segments: Sequence[int] = (0, 0, 0, 0),
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4 or len(stage_strides) != 4:
            raise ValueError(
                f"IResNet needs four stages; got layers={tuple(layers)}, widths={tuple(widths)}"
                f", stage_strides={tuple(stage_strides)}"
            )
        total_stride = stem_stride
        for s in stage_strides:
            total_stride *= s
        if total_stride != 16:
            raise ValueError(
                f"stem_stride × stage_strides must be 16 (112 → 7); got stem_stride="
                f"{stem_stride}, stage_strides={tuple(stage_strides)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        if len(checkpoint_segments) != 4 or not all(
            0 <= s <= n for s, n in zip(checkpoint_segments, layers)
        ):
            raise ValueError(
                f"checkpoint_segments must give each of the four stages 0 to its block count "
                f"{tuple(layers)} segments; got {tuple(checkpoint_segments)}"
            )
        self.fp16 = fp16
        self.checkpoint_segments = tuple(checkpoint_segments)
        self.conv1 = nn.Conv2d(
            3, widths[0], kernel_size=3, stride=stem_stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        in_ch = widths[0]
        for i, (n_blocks, width, stride) in enumerate(zip(layers, widths, stage_strides)):
            blocks = [IBasicBlock(in_ch, width, stride=stride)]
            blocks += [IBasicBlock(width, width) for _ in range(1, n_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = width
        self.bn2 = nn.BatchNorm2d(in_ch, eps=1e-5)
        # Not in place: the tensor flowing out of ``bn2`` is what feature hooks capture.
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch * _FEATURE_HW * _FEATURE_HW, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        # Meta tensors hold no values to set; skipping them saves seconds on r2060's 1030 blocks.
        if not self.conv1.weight.is_meta:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, 0.0, 0.1)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            nn.init.ones_(self.features.weight)
        # The embedding BN learns a shift only (its scale is fixed at one).
        self.features.weight.requires_grad_(False)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.fused_bn_prelu == "off" or not self.training:
            return self.prelu(self.bn1(x))
        return bn_prelu(x, self.bn1, self.prelu, kernel=self.fused_bn_prelu)

    def blocks(self) -> List[IBasicBlock]:
        """The residual blocks, in order."""
        return [b for layer in (self.layer1, self.layer2, self.layer3, self.layer4) for b in layer]

    def compile_blocks(self, **options: Any) -> int:
        """``torch.compile`` the stem and each residual block in place, one region each.

        Blocks of one stage past its first have the same code, shapes and guards, so Dynamo
        compiles them once: any IResNet compiles at most eight block graphs plus the stem,
        r100 as fast as r18. The head (``bn2``, where the OT term's feature hook usually sits,
        the FC and the BatchNorm1d) stays eager, and DistributedDataParallel can still
        all-reduce one block's gradients while the blocks before it run their backward.
        Parameter names, hence the ``state_dict``, do not change.

        Args:
            options: keyword arguments of :func:`torch.compile` (``mode``, ``backend``, …).

        Returns:
            The number of compiled regions (blocks + the stem).
        """
        blocks = self.blocks()
        for block in blocks:
            block.compile(**options)
        # An instance attribute shadows the method: forward() then calls the compiled stem.
        self._stem = torch.compile(self._stem, **options)
        return len(blocks) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 112, 112)`` images → ``(N, num_features)`` embeddings (not normalised)."""
        with cuda_autocast(x, fp16=self.fp16):
            x = self._stem(x)
            for stage, segments in zip(
                (self.layer1, self.layer2, self.layer3, self.layer4), self.checkpoint_segments
            ):
                if segments and self.training:
                    x = checkpoint_sequential(stage, segments, x, use_reentrant=False)
                else:
                    x = stage(x)
            x = self.bn2(x)
            x = self.dropout(torch.flatten(x, 1))
        x = self.fc(x.float() if self.fp16 else x)
        return self.features(x)
