"""Hard-triplet mining against hand-built batches and a plain per-anchor loop."""

import math

import pytest
import torch

from otface.mining import HardTriplets, mine_hard_triplet_slots, mine_hard_triplets


def _unit(*angles_deg):
    return torch.tensor(
        [[math.cos(math.radians(t)), math.sin(math.radians(t))] for t in angles_deg]
    )


def _loop(emb, labels, margin, valid):
    """Plain per-anchor reference of the spec's rule."""
    e = torch.nn.functional.normalize(emb.double(), dim=1)
    s = e @ e.T
    out = []
    for i in range(len(labels)):
        if not valid[i]:
            continue
        pos = [j for j in range(len(labels)) if j != i and labels[j] == labels[i] and valid[j]]
        neg = [j for j in range(len(labels)) if labels[j] != labels[i] and valid[j]]
        if not pos or not neg:
            continue
        p = min(pos, key=lambda j: s[i, j].item())
        n = max(neg, key=lambda j: s[i, j].item())
        if s[i, n] + margin > s[i, p]:
            out.append((i, p, n))
    return out


def test_hand_built_batch():
    # id 0 at 0°, 10°, 80°; id 1 at 40°, 170°. Anchor 0: hardest positive 2 (80°, S=cos80),
    # hardest negative 3 (40°, S=cos40) → hard. Anchor 1: positive 2 (70° away), negative 3
    # (30° away) → hard. Anchor 2: positive 0 (80°), negative 3 (40°) → hard. Anchor 3:
    # positive 4 (130°), negative 1 (30°) → hard. Anchor 4: positive 3 (130°), negative 2 (90°)
    # → hard.
    emb = _unit(0, 10, 80, 40, 170)
    labels = torch.tensor([0, 0, 0, 1, 1])
    t = mine_hard_triplets(emb, labels)
    assert isinstance(t, HardTriplets)
    assert t.anchor.tolist() == [0, 1, 2, 3, 4]
    assert t.positive.tolist() == [2, 2, 0, 4, 3]
    assert t.negative.tolist() == [3, 3, 3, 1, 2]
    assert t.anchor.dtype == torch.int64


def test_easy_batch_and_margin():
    # Two tight clusters far apart: nothing is hard without margin; a margin of 2 makes all hard.
    emb = _unit(0, 5, 90, 95)
    labels = torch.tensor([0, 0, 1, 1])
    assert mine_hard_triplets(emb, labels).anchor.numel() == 0
    t = mine_hard_triplets(emb, labels, mining_margin=2.0)
    assert t.anchor.tolist() == [0, 1, 2, 3]
    assert t.positive.tolist() == [1, 0, 3, 2]
    assert t.negative.tolist() == [2, 2, 1, 1]  # the closer cluster member


def test_all_unique_labels_and_one_identity_are_empty():
    emb = torch.randn(8, 16)
    assert mine_hard_triplets(emb, torch.arange(8)).anchor.numel() == 0
    assert mine_hard_triplets(emb, torch.zeros(8, dtype=torch.long)).anchor.numel() == 0


@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_vectorised_equals_loop(margin):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(32, 8, generator=g)
    labels = torch.randint(0, 6, (32,), generator=g)
    emb[5, 3] = float("nan")
    emb[9, 0] = float("inf")
    valid = torch.ones(32, dtype=torch.bool)
    valid[12] = False
    t = mine_hard_triplets(emb, labels, mining_margin=margin, valid=valid)
    ref_valid = torch.isfinite(emb).all(1) & valid
    ref = _loop(emb, labels, margin, ref_valid)
    got = list(zip(t.anchor.tolist(), t.positive.tolist(), t.negative.tolist()))
    assert got == ref and len(ref) > 0
    assert not {5, 9, 12} & set(sum(map(list, got), []))


def test_cap_keeps_largest_violations():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(24, 4, generator=g)
    labels = torch.randint(0, 4, (24,), generator=g)
    full = mine_hard_triplets(emb, labels, mining_margin=0.5)
    assert full.anchor.numel() > 5
    e = torch.nn.functional.normalize(emb, dim=1)
    viol = [
        (e[a] @ e[n] + 0.5 - e[a] @ e[p]).item()
        for a, p, n in zip(full.anchor.tolist(), full.positive.tolist(), full.negative.tolist())
    ]
    order = sorted(range(len(viol)), key=lambda k: -viol[k])[:5]
    expected = sorted(full.anchor[order].tolist())
    capped = mine_hard_triplets(emb, labels, mining_margin=0.5, max_triplets=5)
    assert capped.anchor.tolist() == expected
    uncapped = mine_hard_triplets(emb, labels, mining_margin=0.5, max_triplets=1000)
    assert torch.equal(uncapped.anchor, full.anchor)


def test_no_grad_and_bad_input():
    emb = torch.randn(6, 4, requires_grad=True)
    t = mine_hard_triplets(emb, torch.tensor([0, 0, 1, 1, 2, 2]), mining_margin=1.0)
    assert not t.anchor.requires_grad
    with pytest.raises(ValueError, match="labels must have shape"):
        mine_hard_triplets(emb, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_triplets"):
        mine_hard_triplets(emb, torch.zeros(6, dtype=torch.long), max_triplets=-1)


def test_similarities_stay_float32_under_autocast():
    # S_an - S_ap is 3e-4 here: positive in float32, but bfloat16 (8-bit mantissa) rounds both
    # similarities to the same value, which would drop the hard anchor 0.
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.436], [0.9, 0.4357], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    ref = _loop(emb, labels, 0.0, [True] * 4)
    assert (0, 1, 2) in ref
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mine_hard_triplets(emb, labels)
    got_rows = list(zip(got.anchor.tolist(), got.positive.tolist(), got.negative.tolist()))
    assert got_rows == ref


@pytest.mark.parametrize("max_triplets", [0, 4, 100])
def test_slots_hold_the_loop_triplets(max_triplets):
    # Fixed-shape slots: their hard entries are the reference triplets (the max_triplets
    # largest violations when capped), and the shape depends only on B and the cap.
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(16) // 4
    emb = torch.randn(4, 5, generator=g)[labels] + 0.6 * torch.randn(16, 5, generator=g)
    valid = [i != 6 for i in range(16)]
    slots = mine_hard_triplet_slots(
        emb, labels, mining_margin=0.0, max_triplets=max_triplets, valid=torch.tensor(valid)
    )
    width = 16 if max_triplets in (0, 100) else max_triplets
    assert all(t.shape == (width,) for t in slots)
    ref = _loop(emb, labels, 0.0, valid)
    assert 4 < len(ref) < 15
    got = sorted((a, p, n) for a, p, n, h in zip(*(t.tolist() for t in slots)) if h)
    if max_triplets == 4:
        capped = mine_hard_triplets(
            emb, labels, mining_margin=0.0, max_triplets=4, valid=torch.tensor(valid)
        )
        ref = list(zip(capped.anchor.tolist(), capped.positive.tolist(), capped.negative.tolist()))
        assert len(ref) == 4
    assert got == sorted(ref)
