"""Hard-triplet mining in a mini-batch (OTFace step 1).

For every anchor ``i`` with at least one positive (``j != i``, same label) and one negative in
the batch, with cosine similarities ``S = normalize(e) @ normalize(e).T``:

* hardest positive ``p(i) = argmin_{y_j = y_i, j != i} S_ij``;
* hardest negative ``n(i) = argmax_{y_j != y_i} S_ij``;
* the anchor is hard iff ``S_{i,n(i)} + mining_margin > S_{i,p(i)}``.

Mining runs under :func:`torch.no_grad` and is vectorised over the batch.
:func:`mine_hard_triplets` returns the hard triplets alone, so its size depends on the data (a
host sync on CUDA); :func:`mine_hard_triplet_slots` returns a fixed number of slots with a mask
of the hard ones, and reads nothing on the host.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "HardTripletSlots",
    "HardTriplets",
    "mine_hard_triplet_slots",
    "mine_hard_triplets",
]


class HardTriplets(NamedTuple):
    """Indices into the batch of the hard triplets, in increasing anchor order.

    Attributes:
        anchor: ``(h,)`` int64 anchor indices.
        positive: ``(h,)`` int64 hardest-positive indices.
        negative: ``(h,)`` int64 hardest-negative indices.
    """

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor


class HardTripletSlots(NamedTuple):
    """A fixed number ``s`` of triplet slots, of which those flagged in ``hard`` are hard.

    Attributes:
        anchor: ``(s,)`` int64 anchor indices (every row of the batch when uncapped, else the
            ``s`` largest violations).
        positive: ``(s,)`` int64 hardest-positive indices (meaningless where not ``hard``).
        negative: ``(s,)`` int64 hardest-negative indices (meaningless where not ``hard``).
        hard: ``(s,)`` bool, the slots holding a hard triplet.
    """

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    hard: torch.Tensor


def _check_inputs(embeddings: torch.Tensor, labels: torch.Tensor, max_triplets: int) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (B, D), got shape {tuple(embeddings.shape)}")
    batch = embeddings.shape[0]
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    if max_triplets < 0:
        raise ValueError(f"max_triplets must be >= 0 (0 = no cap), got {max_triplets!r}")


def _hardest(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    mining_margin: float,
    valid: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positive, negative, violation, hard)`` for every row of the batch, on the device."""
    batch = embeddings.shape[0]
    device = embeddings.device
    ok = torch.isfinite(embeddings).all(dim=1)
    if valid is not None:
        ok = ok & valid.to(device=device, dtype=torch.bool)

    # Similarities in float32 even inside a caller's autocast region (which would run the
    # matmul in half precision and blur near-ties of S_an and S_ap).
    with torch.autocast(device_type=device.type, enabled=False):
        emb = torch.where(ok.unsqueeze(1), embeddings.float(), 0.0)
        emb = F.normalize(emb, dim=1)
        sim = emb @ emb.T

    pair_ok = ok.unsqueeze(0) & ok.unsqueeze(1)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(batch, dtype=torch.bool, device=device)
    pos_mask = same & ~eye & pair_ok
    neg_mask = ~same & pair_ok

    # Python-scalar fill values: a CUDA tensor built from a Python number would be a
    # host-to-device copy, i.e. a stream synchronisation, on every step.
    s_pos = torch.where(pos_mask, sim, float("inf"))
    s_ap, positive = s_pos.min(dim=1)
    s_neg = torch.where(neg_mask, sim, float("-inf"))
    s_an, negative = s_neg.max(dim=1)

    violation = s_an + mining_margin - s_ap
    hard = pos_mask.any(dim=1) & neg_mask.any(dim=1) & (violation > 0)
    return positive, negative, violation, hard


@torch.no_grad()
def mine_hard_triplet_slots(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    mining_margin: float = 0.0,
    max_triplets: int = 0,
    valid: Optional[torch.Tensor] = None,
) -> HardTripletSlots:
    """The hard triplets of :func:`mine_hard_triplets` in ``min(B, max_triplets or B)`` slots.

    Same rule, same triplets; the shapes depend only on ``B`` and ``max_triplets``, so nothing
    is read on the host (no ``nonzero``). Uncapped, slot ``i`` is anchor ``i``; capped, the
    slots hold the largest violations, hard ones first.

    Args:
        embeddings: ``(B, D)`` embeddings.
        labels: ``(B,)`` integer identity labels.
        mining_margin: an anchor is hard iff ``S_an + mining_margin > S_ap``.
        max_triplets: number of slots (0: ``B``).
        valid: optional ``(B,)`` bool mask of usable rows.

    Returns:
        :class:`HardTripletSlots`.
    """
    _check_inputs(embeddings, labels, max_triplets)
    positive, negative, violation, hard = _hardest(embeddings, labels, mining_margin, valid)
    batch = embeddings.shape[0]
    if max_triplets and max_triplets < batch:
        score = torch.where(hard, violation, float("-inf"))
        anchor = score.topk(max_triplets).indices
        return HardTripletSlots(
            anchor, positive[anchor], negative[anchor], hard.index_select(0, anchor)
        )
    anchor = torch.arange(batch, device=embeddings.device)
    return HardTripletSlots(anchor, positive, negative, hard)


@torch.no_grad()
def mine_hard_triplets(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    mining_margin: float = 0.0,
    max_triplets: int = 0,
    valid: Optional[torch.Tensor] = None,
) -> HardTriplets:
    """Mine the hard triplets ``(i, p(i), n(i))`` of a batch.

    Rows whose embedding is not finite (NaN/Inf), or that ``valid`` flags False, take no part:
    they are neither anchors nor candidates.

    Args:
        embeddings: ``(B, D)`` embeddings (any float dtype; similarities in float32).
        labels: ``(B,)`` integer identity labels.
        mining_margin: an anchor is hard iff ``S_an + mining_margin > S_ap``.
        max_triplets: keep at most this many, those with the largest violation
            ``S_an + mining_margin - S_ap``; 0 keeps all.
        valid: optional ``(B,)`` bool mask of usable rows.

    Returns:
        :class:`HardTriplets` (empty when the batch has no positives, no negatives or no
        violation).
    """
    _check_inputs(embeddings, labels, max_triplets)
    positive, negative, violation, hard = _hardest(embeddings, labels, mining_margin, valid)
    anchor = hard.nonzero().squeeze(1)
    if max_triplets and anchor.numel() > max_triplets:
        keep = violation[anchor].topk(max_triplets).indices
        anchor = anchor[keep].sort().values
    return HardTriplets(anchor, positive[anchor], negative[anchor])
