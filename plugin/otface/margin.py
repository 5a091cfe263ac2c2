"""Combined angular/additive margins for softmax face recognition (ArcFace, CosFace, both).

For a cosine logit ``cos θ`` between an embedding and a class centre, the target class gets

    s · (cos(m1·θ + m2) − m3)

and every other class gets ``s · cos θ``. ``(m1, m2, m3) = (1, 0.5, 0)`` is ArcFace
(Deng et al., arXiv 1801.07698), ``(1, 0, 0.4)`` is CosFace / AM-Softmax, and any other triple
is the combined margin of the ArcFace paper (its eq. 4).

Differences from arcface_torch's ``CombinedMarginLoss``, on purpose:

* arcface_torch silently ignores ``m1`` and ``m2`` when ``m3 > 0`` and raises a bare exception
  for ``m1 != 1`` with ``m3 == 0``; here the general formula above is used for every triple.
  For arcface_torch's two supported cases the values are the same.
* Gradient policy. arcface_torch applies the angle margin outside autograd, so the gradient
  passes through the target logit as if it were plain ``cos θ`` ("straight-through"). That is
  the default here too (``exact_grad=False``). ``exact_grad=True`` differentiates the formula:
  ``d/dc cos(m1·acos c + m2) = m1·sin(m1·θ + m2) / sin θ``, with ``θ`` clamped away from 0 and π
  in the gradient only (values stay exact), so ``|cos θ| = 1`` gives a large finite gradient,
  never NaN.
* Nothing is modified in place; the input logits are left as they were.

When ``m1·θ + m2 > π`` the target logit is no longer monotone in ``θ``; as in arcface_torch,
no correction ("easy margin" or the linear fallback of the original ArcFace code) is applied.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CombinedMarginLoss", "margin_logits"]


def _check_margins(
    scale: float, m1: float, m2: float, m3: float, interclass_filtering_threshold: float
) -> None:
    values = {
        "scale": scale,
        "m1": m1,
        "m2": m2,
        "m3": m3,
        "interclass_filtering_threshold": interclass_filtering_threshold,
    }
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a real number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if m1 <= 0:
        raise ValueError(f"m1 (multiplicative angular margin) must be > 0, got {m1!r}")
    if not 0 <= m2 < math.pi:
        raise ValueError(f"m2 (additive angular margin, radians) must be in [0, pi), got {m2!r}")
    if m3 < 0:
        raise ValueError(f"m3 (additive cosine margin) must be >= 0, got {m3!r}")
    if not 0 <= interclass_filtering_threshold <= 1:
        raise ValueError(
            "interclass_filtering_threshold must be in [0, 1] (0 disables it), "
            f"got {interclass_filtering_threshold!r}"
        )


class _AngularMarginFn(torch.autograd.Function):
    """``cos(m1·acos(c) + m2)`` with a finite derivative at ``c = ±1``."""

    @staticmethod
    def forward(ctx, cos: torch.Tensor, m1: float, m2: float) -> torch.Tensor:
        theta = torch.acos(cos)
        ctx.save_for_backward(theta)
        ctx.m1 = m1
        ctx.m2 = m2
        return torch.cos(m1 * theta + m2)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (theta,) = ctx.saved_tensors
        # sin θ vanishes at θ ∈ {0, π}; evaluate the derivative a hair inside instead.
        # The limit is finite for removable cases (m2 = 0) and this clamp approximates it.
        tiny = math.sqrt(torch.finfo(theta.dtype).eps)
        theta = theta.clamp(tiny, math.pi - tiny)
        grad = ctx.m1 * torch.sin(ctx.m1 * theta + ctx.m2) / torch.sin(theta)
        return grad_out * grad, None, None


def _target_margin(
    cos: torch.Tensor, *, m1: float, m2: float, m3: float, exact_grad: bool
) -> torch.Tensor:
    """``cos(m1·θ + m2) − m3`` of target cosines ``cos`` (any shape)."""
    if m1 == 1.0 and m2 == 0.0:
        # Pure additive cosine margin: exact in value and gradient, no acos round trip.
        return cos - m3
    if exact_grad:
        return _AngularMarginFn.apply(cos, float(m1), float(m2)) - m3
    with torch.no_grad():
        value = torch.cos(m1 * torch.acos(cos) + m2) - m3
    # Value of the margin, gradient of the identity (arcface_torch's straight-through).
    return value + (cos - cos.detach())


def margin_logits(
    cos: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float,
    m1: float,
    m2: float,
    m3: float,
    interclass_filtering_threshold: float = 0.0,
    exact_grad: bool = False,
) -> torch.Tensor:
    """Scaled logits with the combined margin on each row's target class.

    Args:
        cos: ``(N, C)`` cosine similarities, expected in ``[-1, 1]`` (clamp before calling).
        labels: ``(N,)`` (or ``(N, 1)``) int64 column of the target class in ``cos`` for each
            row, or ``-1`` when the row's class is not among these ``C`` columns (another rank's
            shard, or not sampled); such rows get no margin.
        scale: ``s``, the logit scale (arcface_torch uses 64).
        m1: multiplicative angular margin (``> 0``; 1 disables it).
        m2: additive angular margin in radians (``[0, π)``; ArcFace 0.5).
        m3: additive cosine margin (``>= 0``; CosFace 0.4).
        interclass_filtering_threshold: if ``> 0``, non-target cosines above it are set to 0
            (value and gradient) before the margin, as arcface_torch does; 0 disables it.
        exact_grad: differentiate the margin exactly instead of arcface_torch's
            straight-through gradient (see the module docstring).

    Returns:
        ``(N, C)`` logits ``s·(cos(m1·θ + m2) − m3)`` at ``(i, labels[i])`` and ``s·cos`` elsewhere,
        in ``cos``'s dtype and device. ``cos`` is not modified.
    """
    _check_margins(scale, m1, m2, m3, interclass_filtering_threshold)
    if cos.dim() != 2:
        raise ValueError(f"cos must have shape (N, C), got {tuple(cos.shape)}")
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    if labels.dim() != 1 or labels.shape[0] != cos.shape[0]:
        raise ValueError(
            f"labels must have shape ({cos.shape[0]},) or ({cos.shape[0]}, 1) to match cos "
            f"{tuple(cos.shape)}, got {tuple(labels.shape)}"
        )
    labels = labels.to(device=cos.device, dtype=torch.long)
    # Fixed-shape masks instead of index lists (no host sync): rows labelled -1 (their class is
    # on another rank) read column 0 and write it back unchanged.
    held = (labels != -1).unsqueeze(1)
    column = labels.clamp(min=0).unsqueeze(1)

    if interclass_filtering_threshold > 0:
        with torch.no_grad():
            keep = cos <= interclass_filtering_threshold
            keep.scatter_(1, column, keep.gather(1, column) | held)
        cos = cos * keep.to(cos.dtype)

    picked = cos.gather(1, column)
    # Unlabelled rows get a harmless 0 inside the margin, so no NaN/Inf gradient can leak
    # through the branch torch.where discards.
    safe = torch.where(held, picked, torch.zeros_like(picked))
    target = _target_margin(safe, m1=m1, m2=m2, m3=m3, exact_grad=exact_grad)
    logits = cos.scatter(1, column, torch.where(held, target, picked))
    return logits * scale


class CombinedMarginLoss(nn.Module):
    """Module form of :func:`margin_logits`, arcface_torch's ``margin_loss(logits, labels)`` seam.

    Args:
        s: logit scale.
        m1, m2, m3: the combined margin ``cos(m1·θ + m2) − m3``; ``(1, 0.5, 0)`` is ArcFace,
            ``(1, 0, 0.4)`` CosFace.
        interclass_filtering_threshold: see :func:`margin_logits`.
        exact_grad: see :func:`margin_logits`.
    """

    def __init__(
        self,
        s: float,
        m1: float,
        m2: float,
        m3: float,
        *,
        interclass_filtering_threshold: float = 0.0,
        exact_grad: bool = False,
    ) -> None:
        super().__init__()
        _check_margins(s, m1, m2, m3, interclass_filtering_threshold)
        self.s = float(s)
        self.m1 = float(m1)
        self.m2 = float(m2)
        self.m3 = float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.exact_grad = bool(exact_grad)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` cosines and ``(N,)`` or ``(N, 1)`` labels (-1: not here) → ``(N, C)``."""
        return margin_logits(
            logits,
            labels,
            scale=self.s,
            m1=self.m1,
            m2=self.m2,
            m3=self.m3,
            interclass_filtering_threshold=self.interclass_filtering_threshold,
            exact_grad=self.exact_grad,
        )

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"interclass_filtering_threshold={self.interclass_filtering_threshold}, "
            f"exact_grad={self.exact_grad}"
        )
