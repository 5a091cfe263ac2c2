"""Margin heads with running statistics: AdaFace and CurricularFace, for Partial FC.

Both plug into :class:`otface.partial_fc.PartialFC` where arcface_torch's
``margin_loss(cos, labels)`` goes, and take one extra input that Partial FC supplies for the
whole global batch, so that every rank computes the same statistics without a collective of
its own:

* :class:`AdaFaceMargin` (Kim et al., "AdaFace: Quality Adaptive Margin for Face Recognition",
  CVPR 2022). With ``ẑ = clip(h · (‖z‖ − μ) / (σ + eps), −1, 1)`` from the detached
  feature norm ``‖z‖`` (before normalisation, clipped to ``[0.001, 100]``) and the exponential
  moving averages ``μ, σ`` (weight ``t_alpha``) of the batch's norm mean and (unbiased) standard
  deviation, the target logit is ``s · (cos(clip(θ − m·ẑ, eps, π − eps)) − (m + m·ẑ))``
  (angular margin ``g_angle = −m·ẑ``, additive ``g_add = m + m·ẑ``) and every other logit
  ``s · cos θ``. All cosines are first clamped to ``[−1 + eps, 1 − eps]``, ``eps = 1e-3``,
  as the authors' code does, so ``acos`` never meets ±1. ``μ, σ`` start at 20 and 100 (the
  authors' values) and are updated with the current batch before its margins are computed.
* :class:`CurricularFaceMargin` (Huang et al., "CurricularFace: Adaptive Curriculum Learning
  Loss for Deep Face Recognition", CVPR 2020). The target logit is ``s·cos(θ_y + m)``
  (``s·(cos θ_y − sin(π − m)·m)`` once ``θ_y + m > π``, the authors' fallback), a negative with
  ``cos θ_j > cos(θ_y + m)`` becomes ``s · cos θ_j · (t + cos θ_j)`` and the others stay
  ``s · cos θ_j``. ``t`` starts at 0 and is the moving average (weight ``alpha``) of the batch's
  mean positive cosine, updated before it is used.

Statistics are of the **global** batch (all ranks): Partial FC gathers every rank's
embeddings anyway, so the norms are known everywhere, and it all-reduces the target cosines
(one ``(N,)`` collective, no host read) because a row's target centre lives on one rank only.
The statistics are buffers of the head, hence entries of Partial FC's ``state_dict``
(``margin_softmax.*``), saved in checkpoints and equal on every rank.

Gradients are those of the formulas (as in both papers' code), not arcface_torch's
straight-through one; ``θ`` is kept away from 0 and π in the derivative, so it stays finite.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from otface.margin import _AngularMarginFn

__all__ = ["HEADS", "AdaFaceMargin", "CurricularFaceMargin", "build_head"]

HEADS = ("combined", "adaface", "curricularface")
_ADAFACE_EPS = 1e-3
_NORM_RANGE = (0.001, 100.0)


def _columns(
    labels: torch.Tensor, cos: torch.Tensor, per_row: Optional[torch.Tensor], what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(held, column)``, both ``(N, 1)``: whether the row's class is among ``cos``'s columns
    and which column (0 when it is not). ``per_row`` is the head's extra input, one value a
    row (``what`` names it in the error)."""
    if per_row is None or per_row.numel() != cos.shape[0]:
        got = None if per_row is None else tuple(per_row.shape)
        raise ValueError(f"the head needs {what} of the {cos.shape[0]} rows, got {got}")
    labels = labels.reshape(-1).to(device=cos.device, dtype=torch.long)
    if labels.shape[0] != cos.shape[0] or cos.dim() != 2:
        raise ValueError(
            f"cos must be (N, C) and labels (N,) or (N, 1); got {tuple(cos.shape)} and "
            f"{tuple(labels.shape)}"
        )
    return (labels != -1).unsqueeze(1), labels.clamp(min=0).unsqueeze(1)


def _ema_(buffer: torch.Tensor, value: torch.Tensor, alpha: float) -> None:
    """``buffer ← value·alpha + (1 − alpha)·buffer`` in place, on the device."""
    buffer.copy_(value.to(buffer.dtype) * alpha + (1.0 - alpha) * buffer)


def _check_real(name: str, value: float, ok: bool, need: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if not ok:
        raise ValueError(f"{name} must be {need}, got {value!r}")
    return float(value)


class AdaFaceMargin(nn.Module):
    """AdaFace's quality-adaptive margin (see the module docstring).

    Args:
        s: logit scale (64 in the paper).
        m: margin (0.4).
        h: concentration of the norm's z-score, ``h`` in ``ẑ`` (0.333).
        t_alpha: weight of the current batch in the moving averages of μ and σ (0.01).

    Forward: ``(N, C)`` cosines, ``(N,)`` or ``(N, 1)`` labels (``-1``: the class is not among
    these columns; the row gets no margin here), and ``norms`` ``(N,)``, the embedding norms of
    the same ``N`` rows (the global batch), before normalisation. Updates μ and σ, then
    returns ``(N, C)`` logits.
    """

    needs_norms = True
    needs_target_cos = False

    def __init__(
        self, s: float = 64.0, *, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01
    ) -> None:
        super().__init__()
        self.s = _check_real("s", s, s > 0, "> 0")
        self.m = _check_real("adaface.m", m, 0 <= m < math.pi, "in [0, pi)")
        self.h = _check_real("adaface.h", h, h > 0, "> 0")
        self.t_alpha = _check_real("adaface.t_alpha", t_alpha, 0 < t_alpha <= 1, "in (0, 1]")
        self.eps = _ADAFACE_EPS
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"

    def statistics(self) -> dict[str, torch.Tensor]:
        """μ and σ now, for the log (detached copies on the device)."""
        return {
            "head_norm_mean": self.batch_mean.detach().clone().reshape(()),
            "head_norm_std": self.batch_std.detach().clone().reshape(()),
        }

    @torch.no_grad()
    def update_statistics(self, norms: torch.Tensor) -> torch.Tensor:
        """Blend the batch's norm mean and unbiased std into μ, σ; return the clipped norms."""
        safe = norms.detach().float().reshape(-1).clamp(*_NORM_RANGE)
        n = safe.numel()
        mean = safe.mean()
        # Unbiased, as torch.std; a batch of one row has no spread (0, not NaN).
        var = (safe - mean).square().sum() / max(n - 1, 1)
        _ema_(self.batch_mean, mean, self.t_alpha)
        _ema_(self.batch_std, var.sqrt(), self.t_alpha)
        return safe

    def margin_scaler(self, safe_norms: torch.Tensor) -> torch.Tensor:
        """``ẑ = clip(h·(‖z‖ − μ)/(σ + eps), −1, 1)`` per row, ``(N,)``, no gradient."""
        z = (safe_norms - self.batch_mean) / (self.batch_std + self.eps)
        return (z * self.h).clamp(-1.0, 1.0)

    def forward(
        self, cos: torch.Tensor, labels: torch.Tensor, *, norms: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        held, column = _columns(labels, cos, norms, "the embedding norms (norms=)")
        scaler = self.margin_scaler(self.update_statistics(norms)).to(cos.dtype).unsqueeze(1)
        cos = cos.clamp(-1.0 + self.eps, 1.0 - self.eps)
        picked = cos.gather(1, column)
        theta = torch.acos(picked)
        theta_m = (theta - self.m * scaler).clamp(self.eps, math.pi - self.eps)
        target = torch.cos(theta_m) - (self.m + self.m * scaler)
        return cos.scatter(1, column, torch.where(held, target, picked)) * self.s


class CurricularFaceMargin(nn.Module):
    """CurricularFace's adaptive hard-negative modulation (see the module docstring).

    Args:
        s: logit scale (64).
        m: additive angular margin in radians (0.5).
        alpha: weight of the current batch in the moving average ``t`` (0.01).

    Forward: ``(N, C)`` cosines in ``[−1, 1]``, ``(N,)`` or ``(N, 1)`` labels (``-1``: the class
    is not among these columns) and ``target_cos`` ``(N,)``, every row's target cosine wherever
    its class lives (Partial FC all-reduces it). Updates ``t``, then returns ``(N, C)`` logits.
    """

    needs_norms = False
    needs_target_cos = True

    def __init__(self, s: float = 64.0, *, m: float = 0.5, alpha: float = 0.01) -> None:
        super().__init__()
        self.s = _check_real("s", s, s > 0, "> 0")
        self.m = _check_real("curricularface.m", m, 0 <= m < math.pi, "in [0, pi)")
        self.alpha = _check_real("curricularface.alpha", alpha, 0 < alpha <= 1, "in (0, 1]")
        self.threshold = math.cos(math.pi - self.m)
        self.fallback = math.sin(math.pi - self.m) * self.m
        self.register_buffer("t", torch.zeros(1))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, alpha={self.alpha}"

    def statistics(self) -> dict[str, torch.Tensor]:
        """``t`` now, for the log (a detached copy on the device)."""
        return {"head_t": self.t.detach().clone().reshape(())}

    def forward(
        self,
        cos: torch.Tensor,
        labels: torch.Tensor,
        *,
        target_cos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        held, column = _columns(labels, cos, target_cos, "the target cosines (target_cos=)")
        with torch.no_grad():
            positive = target_cos.detach().reshape(-1, 1).to(cos.dtype)
            _ema_(self.t, positive.float().mean(), self.alpha)
            t = self.t.to(cos.dtype)
            # cos(θ_y + m) of every row, the boundary past which a negative is hard.
            boundary = torch.cos(torch.acos(positive) + self.m)
            hard = cos > boundary
        out = torch.where(hard, cos * (t + cos), cos)
        picked = cos.gather(1, column)
        # The row's own target cosine where this shard holds it (with its gradient); 0 (a
        # harmless input to the margin) elsewhere, whose result torch.where discards.
        safe = torch.where(held, picked, torch.zeros_like(picked))
        shifted = _AngularMarginFn.apply(safe, 1.0, self.m)
        target = torch.where(safe > self.threshold, shifted, safe - self.fallback)
        return out.scatter(1, column, torch.where(held, target, out.gather(1, column))) * self.s


def build_head(cfg, *, scale: float = 64.0) -> Optional[nn.Module]:
    """The margin module of ``cfg.head`` (``"adaface"``, ``"curricularface"``), or None for
    ``"combined"`` (:class:`otface.margin.CombinedMarginLoss`, built by the caller)."""
    head = cfg.get("head", "combined")
    if head == "combined":
        return None
    if head == "adaface":
        a = cfg.adaface
        return AdaFaceMargin(scale, m=a.m, h=a.h, t_alpha=a.t_alpha)
    if head == "curricularface":
        c = cfg.curricularface
        return CurricularFaceMargin(scale, m=c.m, alpha=c.alpha)
    raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
