"""The OT term of OTFace, ``L_OT`` in ``L = L_margin + lambda(step) * L_OT`` (design spec §2;
the criterion is :class:`otface.loss.OTFaceCriterion`).

:func:`hard_triplet_ot_loss` compares, for every hard triplet ``(a, p, n)`` mined from the
embeddings, the OT distance ``W`` between the anchor's feature distribution and its hardest
positive's and hardest negative's:

* ``variant="hinge"``: ``mean relu(W(a, p) - W(a, n) + ot_margin)``;
* ``variant="pull"``: ``mean W(a, p)``.

Distributions (``mode``): ``"spatial"`` — each sample is the uniform distribution over its
``H*W`` L2-normalised feature vectors, or over its ``T`` tokens for a ViT (all ``(a, p)`` and
``(a, n)`` problems go to one batched solve); ``"group"`` — the hard anchors, their positives
and their negatives each form one uniform distribution over pooled, L2-normalised descriptors
(two problems of ``h x h``, five with the divergence's self-terms).

Masked tokens (``point_mask``, a ViT's ``last_token_mask`` in training) are not support points:
in spatial mode a sample is the uniform distribution over its kept tokens only (the others get
weight 0, so the mask token never enters a distance or receives a gradient from it); in group
mode a sample's descriptor pools its kept tokens only.

The distance (``distance``, :mod:`otface.ot.distance`): ``"divergence"`` (default), the Sinkhorn
divergence ``S_eps = OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2`` (zero for identical
inputs, exact envelope gradient; the self-terms of the samples involved are solved once each, in
the same batched solve as the pairs); ``"entropic"``, ``OT_eps`` (exact envelope gradient);
``"transport"``, ``<T*, C>`` whose gradient ``T*`` is only approximate (kept for comparison).

Mining is local to the rank and the OT term makes no collective call, so ranks that mine
different numbers of triplets (or none) stay in step.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F

from otface.mining import HardTripletSlots, mine_hard_triplet_slots, mine_hard_triplets
from otface.ot import DISTANCES, ot_distances

__all__ = ["MODES", "VARIANTS", "OTLossOutput", "hard_triplet_ot_loss"]

MODES = ("spatial", "group")
VARIANTS = ("hinge", "pull")


class OTLossOutput(NamedTuple):
    """The OT term and what it logs.

    Attributes:
        loss: scalar ``L_OT`` (connected to the feature map even when zero).
        metrics: detached scalars: ``loss_ot``, ``n_hard``, ``w_ap``, ``w_an`` (means of the
            chosen distance), ``sinkhorn_iters``, ``sinkhorn_err`` (over all problems solved,
            self-terms included), ``sinkhorn_unconverged`` (the fraction of those problems
            stopped by ``max_iter`` above ``tol``), ``ot_nonfinite``.
    """

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor]


def _point_weights(
    point_mask: torch.Tensor, points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform weights over each sample's real points, and which samples have any.

    Args:
        point_mask: ``(B, n)`` bool (or ``(B, H, W)`` for a map), True = a real point.
        points: ``(B, n, C)`` points (for the shape, dtype and device).

    Returns:
        ``(B, n)`` weights ``mask / mask.sum()`` in the points' dtype (at least float32); a
        sample with no real point gets uniform weights (it is left out of mining and of the
        loss, but the slot path still solves its self-problem, which needs mass), and
        ``(B,)`` bool, the samples with one real point at least.
    """
    batch, n = points.shape[:2]
    mask = point_mask.reshape(point_mask.shape[0], -1) if point_mask.dim() == 3 else point_mask
    if mask.dim() != 2 or tuple(mask.shape) != (batch, n):
        raise ValueError(
            f"point_mask must be (B, n) = ({batch}, {n}) for these features (or (B, H, W) for a "
            f"map), got shape {tuple(point_mask.shape)}"
        )
    mask = mask.to(device=points.device, dtype=torch.bool)
    count = mask.sum(dim=1, keepdim=True)
    has_points = count.squeeze(1) > 0
    dtype = torch.promote_types(points.dtype, torch.float32)
    w = mask.to(dtype) / count.clamp(min=1).to(dtype)
    weights = torch.where(has_points.unsqueeze(1), w, 1.0 / n)
    return weights, has_points


def _points(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` map → ``(B, H*W, C)``; ``(B, N, C)`` tokens as they are."""
    if features.dim() == 4:
        return features.flatten(2).transpose(1, 2)
    if features.dim() == 3:
        return features
    if features.dim() == 2:
        return features.unsqueeze(1)
    raise ValueError(
        f"the captured feature map must be (B, C, H, W), (B, N, C) or (B, C); got shape "
        f"{tuple(features.shape)}"
    )


def hard_triplet_ot_loss(
    features: torch.Tensor,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    mode: str = "spatial",
    variant: str = "hinge",
    ot_margin: float = 0.05,
    mining_margin: float = 0.0,
    max_triplets: int = 0,
    eps: float = 0.05,
    max_iter: int = 50,
    tol: float = 1e-3,
    solver: str = "auto",
    distance: str = "divergence",
    kernel: str = "auto",
    fixed_shapes: bool = False,
    eps_scaling: float = 0.0,
    relaxation: float = 1.0,
    point_mask: Optional[torch.Tensor] = None,
) -> OTLossOutput:
    """OT loss between the feature distributions of hard triplets (design spec §2, steps 1-4).

    Rows whose embedding or feature map holds a NaN/Inf, or that ``point_mask`` leaves without
    a point, are left out of mining and of the loss and counted in ``ot_nonfinite``; they never
    reach the result.

    Args:
        features: ``(B, C, H, W)`` high-level feature map (or ``(B, N, C)`` tokens), with grad.
        embeddings: ``(B, D)`` embeddings (used for mining only, no gradient).
        labels: ``(B,)`` identity labels.
        mode: ``"spatial"`` or ``"group"``.
        variant: ``"hinge"`` or ``"pull"``.
        ot_margin: margin of the hinge.
        mining_margin: see :func:`otface.mining.mine_hard_triplets`.
        max_triplets: cap on hard triplets (0: none).
        eps: Sinkhorn entropic regularisation.
        max_iter: Sinkhorn iterations at most.
        tol: Sinkhorn marginal-error tolerance.
        solver: ``"auto"``, ``"torch"`` or ``"pot"`` (:func:`otface.ot.solve_ot`).
        distance: ``"divergence"``, ``"entropic"`` or ``"transport"``
            (:func:`otface.ot.ot_distances`).
        kernel: our solver's kernel, ``"auto"``, ``"torch"``, ``"matmul"`` or ``"triton"``
            (:func:`otface.ot.sinkhorn.sinkhorn`).
        fixed_shapes: spatial mode only: solve a fixed number of triplet slots (every anchor,
            or ``max_triplets``) and mask the ones that are not hard, instead of gathering the
            hard ones (:func:`otface.mining.mine_hard_triplet_slots`). The same loss and
            gradient; more problems solved, but no host read of the number of hard triplets
            (a device sync per step on CUDA).
        eps_scaling: the solver's ε-scaling factor (:func:`otface.ot.sinkhorn.sinkhorn`; 0:
            off).
        relaxation: the solver's over-relaxation (1: off).
        point_mask: optional ``(B, N)`` bool (``(B, H, W)`` for a map), True where a point is
            real: the others (a ViT's mask tokens) get weight 0 in spatial mode and are left
            out of the pooling in group mode. None: every point is real.

    Returns:
        :class:`OTLossOutput`.
    """
    if mode not in MODES:
        raise ValueError(f"otface.mode must be one of {MODES}, got {mode!r}")
    if variant not in VARIANTS:
        raise ValueError(f"otface.variant must be one of {VARIANTS}, got {variant!r}")
    if distance not in DISTANCES:
        raise ValueError(f"otface.distance must be one of {DISTANCES}, got {distance!r}")
    batch = embeddings.shape[0]
    if features.shape[0] != batch:
        raise ValueError(
            f"the hooked feature map holds {features.shape[0]} samples but the embeddings "
            f"{batch}: was the backbone's forward for this batch the last one?"
        )
    with torch.no_grad():
        # Reduced dimension by dimension: flatten(1) would copy a channels_last map.
        finite = torch.isfinite(features.detach())
        while finite.dim() > 1:
            finite = finite.all(dim=-1)
        finite &= torch.isfinite(embeddings.detach()).all(dim=1)
        weights = None
        if point_mask is not None:
            weights, has_points = _point_weights(point_mask, _points(features.detach()))
            finite &= has_points
    mine = dict(mining_margin=mining_margin, max_triplets=max_triplets, valid=finite)
    # The cosine cost lies in [0, 2]: the solver picks its kernel without a host sync.
    solve = dict(
        distance=distance,
        eps=eps,
        max_iter=max_iter,
        tol=tol,
        solver=solver,
        cost_range=2.0,
        kernel=kernel,
        eps_scaling=eps_scaling,
        relaxation=relaxation,
        # The trainer warns on the logged fraction of unconverged problems instead.
        warn=False,
    )
    if fixed_shapes and mode == "spatial":
        slots = mine_hard_triplet_slots(embeddings.detach(), labels, **mine)
        return _slot_ot_loss(
            features,
            slots,
            finite,
            variant=variant,
            ot_margin=ot_margin,
            ot_kwargs=dict(solve, weights=weights),
        )
    triplets = mine_hard_triplets(embeddings.detach(), labels, **mine)
    safe, zero = _zero_nonfinite(features, finite)
    n_hard = triplets.anchor.numel()
    device = features.device
    # Scalars for the log are filled on the device: torch.tensor(x, device="cuda") is a
    # host-to-device copy, which synchronises the stream.
    metrics = {
        "n_hard": torch.full((), float(n_hard), device=device),
        "ot_nonfinite": (~finite).sum().float(),
    }
    if n_hard == 0:
        z = torch.zeros((), device=device)
        metrics.update(
            loss_ot=z, w_ap=z, w_an=z, sinkhorn_iters=z, sinkhorn_err=z, sinkhorn_unconverged=z
        )
        return OTLossOutput(zero.float(), metrics)

    a, p, n = triplets
    # A bank of distributions and the (a, p), (a, n) pairs as indices into it: spatial mode,
    # one distribution per sample; group mode, three (anchors, positives, negatives).
    bank_weights = None
    if mode == "spatial":
        bank = _points(safe)
        bank_weights = weights
        source, target = torch.cat([a, a]), torch.cat([p, n])
    else:
        points = _points(safe).float()
        if weights is None:
            pooled = points.mean(dim=1)
        else:
            pooled = (points * weights.to(points.dtype).unsqueeze(-1)).sum(dim=1)
        pooled = F.normalize(pooled, dim=-1)
        # index_select: a deterministic backward with repeated indices (see ot_distances).
        bank = torch.stack([pooled.index_select(0, i) for i in (a, p, n)])
        source = torch.zeros(2, dtype=torch.long, device=device)
        target = torch.arange(1, 3, device=device)
    res = ot_distances(bank, source, target, weights=bank_weights, **solve)
    w = res.value
    half = w.shape[0] // 2
    w_ap, w_an = w[:half], w[half:]
    if variant == "hinge":
        loss = F.relu(w_ap - w_an + ot_margin).mean()
    else:
        loss = w_ap.mean()
    loss = loss + zero
    metrics.update(_solve_metrics(res, device), loss_ot=loss.detach())
    metrics.update(w_ap=w_ap.detach().mean(), w_an=w_an.detach().mean())
    return OTLossOutput(loss, metrics)


def _zero_nonfinite(
    features: torch.Tensor, finite: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``features`` with the non-finite rows zeroed, and a zero connected to ``features``.

    Non-finite rows are zeroed before any use, so neither their values nor a NaN gradient can
    leak (always applied: testing for them first would cost a host sync per step). The zero
    keeps the feature map in the graph when nothing is hard; it is built from one element so
    that a half-precision sum cannot overflow.
    """
    keep = finite.view(-1, *([1] * (features.dim() - 1)))
    safe = torch.where(keep, features, 0.0)
    return safe, safe[(slice(0, 1),) * safe.dim()].float().sum() * 0.0  # a view, any layout


def _solve_metrics(res, device: torch.device) -> Dict[str, torch.Tensor]:
    # n_iter is an int (torch kernels) or a device tensor (fused kernel): no host read.
    return {
        "sinkhorn_iters": torch.as_tensor(res.n_iter, device=device).float(),
        "sinkhorn_err": res.marginal_error.detach().float(),
        "sinkhorn_unconverged": res.unconverged.float(),
    }


def _slot_ot_loss(
    features: torch.Tensor,
    slots: HardTripletSlots,
    finite: torch.Tensor,
    *,
    variant: str,
    ot_margin: float,
    ot_kwargs: dict,
) -> OTLossOutput:
    """Spatial-mode OT loss over fixed triplet slots: shapes never depend on the data."""
    safe, zero = _zero_nonfinite(features, finite)
    a, p, n, hard = slots
    # Every sample's self-problem is solved ("all"): finding the ones in use would read their
    # number on the host.
    res = ot_distances(
        _points(safe),
        torch.cat([a, a]),
        torch.cat([p, n]),
        self_terms="all",
        **ot_kwargs,
    )
    w_ap, w_an = res.value.chunk(2)
    n_hard = hard.sum()
    count = n_hard.clamp(min=1).float()
    # where, not a product with the mask: a slot that is not hard contributes nothing, not
    # even a NaN times zero.
    term = F.relu(w_ap - w_an + ot_margin) if variant == "hinge" else w_ap
    loss = torch.where(hard, term, 0.0).sum() / count + zero
    metrics = {
        "n_hard": n_hard.float(),
        "ot_nonfinite": (~finite).sum().float(),
        "loss_ot": loss.detach(),
        "w_ap": torch.where(hard, w_ap.detach(), 0.0).sum() / count,
        "w_an": torch.where(hard, w_an.detach(), 0.0).sum() / count,
    }
    metrics.update(_solve_metrics(res, features.device))
    return OTLossOutput(loss, metrics)
