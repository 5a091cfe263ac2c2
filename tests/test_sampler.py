"""P×K and uniform batch samplers, checked against the properties the issue states."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest

from otface.data.sampler import PKBatchSampler, UniformBatchSampler


def _labels(counts: list[int]) -> np.ndarray:
    labels = np.concatenate([np.full(c, i) for i, c in enumerate(counts)])
    return np.random.default_rng(0).permutation(labels)  # identities spread over the indices


def _epoch(labels, *, world_size, epoch=0, start_batch=0, **kw):
    out = []
    for rank in range(world_size):
        s = PKBatchSampler(labels, rank=rank, world_size=world_size, **kw)
        s.set_epoch(epoch, start_batch=start_batch)
        out.append(list(s))
    return out


def test_pk_batches_are_p_identities_times_k():
    labels = _labels([6, 9, 4, 12, 5, 8, 7, 10, 4, 6, 11, 5])
    batch_size, k = 8, 4
    for rank_batches in _epoch(labels, world_size=2, batch_size=batch_size, k=k, seed=1):
        for batch in rank_batches:
            assert len(batch) == batch_size
            per_id = Counter(labels[batch].tolist())
            assert len(per_id) == batch_size // k and set(per_id.values()) == {k}
            assert len(set(batch)) == batch_size  # identities have >= k images: no repeats


def test_pk_ranks_disjoint_and_batch_count():
    labels = _labels([5] * 30 + [9] * 10)
    n = labels.size
    for world_size, batch_size, k in [(1, 8, 4), (2, 8, 2), (3, 12, 4), (4, 4, 4)]:
        per_rank = _epoch(labels, world_size=world_size, batch_size=batch_size, k=k, seed=7)
        expected = n // (batch_size * world_size)
        assert [len(b) for b in per_rank] == [expected] * world_size
        for step in range(expected):
            ids = [set(labels[per_rank[r][step]].tolist()) for r in range(world_size)]
            assert len(set().union(*ids)) == sum(len(s) for s in ids)
        s = PKBatchSampler(labels, batch_size=batch_size, k=k, world_size=world_size)
        assert len(s) == expected


def test_pk_num_image_sets_batch_count():
    labels = _labels([4] * 10)
    s = PKBatchSampler(labels, batch_size=8, k=4, rank=1, world_size=2, num_image=1000)
    assert len(s) == len(list(s)) == 1000 // 16


def test_pk_seeded_order():
    labels = _labels([6] * 20)
    a = _epoch(labels, world_size=2, batch_size=8, k=2, seed=3)
    b = _epoch(labels, world_size=2, batch_size=8, k=2, seed=3)
    c = _epoch(labels, world_size=2, batch_size=8, k=2, seed=3, epoch=1)
    d = _epoch(labels, world_size=2, batch_size=8, k=2, seed=4)
    assert a == b and a != c and a != d


def test_pk_covers_images_once_per_epoch_when_divisible():
    # Every identity has 4 images = k; one epoch of 40 images in batches of 8 uses each once.
    labels = _labels([4] * 10)
    (batches,) = _epoch(labels, world_size=1, batch_size=8, k=4, seed=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(40))


def test_pk_start_batch_skips_exactly():
    labels = _labels([7] * 24)
    for world_size in (1, 2):
        full = _epoch(labels, world_size=world_size, batch_size=8, k=4, seed=5, epoch=2)
        tail = _epoch(
            labels, world_size=world_size, batch_size=8, k=4, seed=5, epoch=2, start_batch=3
        )
        assert tail == [b[3:] for b in full]
    s = PKBatchSampler(labels, batch_size=8, k=4)
    with pytest.raises(ValueError, match="start_batch"):
        s.set_epoch(0, start_batch=len(s) + 1)


def test_pk_few_images_warns_once_and_draws_with_replacement():
    labels = _labels([1, 2, 6, 6, 6, 6])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = PKBatchSampler(labels, batch_size=8, k=4, seed=0, num_image=200)
        batches = [list(s) for _ in range(2)]
    relevant = [w for w in caught if "fewer than sampler.k=4" in str(w.message)]
    assert len(relevant) == 1 and "2 of 6 identities" in str(relevant[0].message)
    seen_small = False
    for batch in batches[0] + batches[1]:
        per_id = Counter(labels[batch].tolist())
        assert set(per_id.values()) == {4}
        for ident in (0, 1):
            if ident in per_id:
                seen_small = True
                group = [i for i in batch if labels[i] == ident]
                assert set(group) == set(np.flatnonzero(labels == ident).tolist())
    assert seen_small


def test_pk_bad_arguments():
    labels = _labels([4] * 8)
    with pytest.raises(ValueError, match=r"batch_size=8, sampler\.k=3"):
        PKBatchSampler(labels, batch_size=8, k=3)
    with pytest.raises(ValueError, match="at least P \\* world_size = 2 \\* 5 = 10 identities"):
        PKBatchSampler(labels, batch_size=8, k=4, world_size=5, rank=0, num_image=1000)
    with pytest.raises(ValueError, match="rank"):
        PKBatchSampler(labels, batch_size=8, k=4, world_size=2, rank=2)


def test_uniform_matches_arcface_order():
    n, batch_size, world_size = 103, 4, 3
    per_rank = []
    for rank in range(world_size):
        s = UniformBatchSampler(n, batch_size=batch_size, rank=rank, world_size=world_size, seed=9)
        s.set_epoch(1)
        per_rank.append(list(s))
        assert len(per_rank[-1]) == len(s) == n // (batch_size * world_size)
    # Reference: the seed+epoch permutation, ranks take every world_size-th index.
    perm = np.random.default_rng(9 + 1).permutation(n)
    used = len(per_rank[0]) * batch_size * world_size
    for rank in range(world_size):
        mine = perm[:used][rank::world_size]
        assert [i for b in per_rank[rank] for i in b] == mine.tolist()
    flat = [i for r in per_rank for b in r for i in b]
    assert len(flat) == len(set(flat))
    s = UniformBatchSampler(n, batch_size=batch_size, seed=9)
    s.set_epoch(1, start_batch=5)
    full = UniformBatchSampler(n, batch_size=batch_size, seed=9)
    full.set_epoch(1)
    assert list(s) == list(full)[5:]


def _flips(rank, *, epoch=0, start_batch=0, seed=3):
    from otface.data.sampler import FlipBatchSampler

    inner = UniformBatchSampler(64, batch_size=8, rank=rank, world_size=2, seed=seed)
    s = FlipBatchSampler(inner, seed=seed, rank=rank)
    s.set_epoch(epoch, start_batch=start_batch)
    return list(s)


def test_flip_sampler_keeps_the_batches_and_flips_about_half():
    from otface.data.sampler import FlipBatchSampler

    inner = UniformBatchSampler(64, batch_size=8, rank=1, world_size=2, seed=3)
    plain = list(inner)
    flipped = list(FlipBatchSampler(inner, seed=3, rank=1))
    assert [[i for i, _ in b] for b in flipped] == plain
    share = np.mean([f for b in flipped for _, f in b])
    assert 0.2 < share < 0.8


def test_flips_differ_across_ranks_and_epochs_and_repeat_after_a_resume():
    r0, r1 = _flips(0), _flips(1)
    assert [f for b in r0 for _, f in b] != [f for b in r1 for _, f in b]
    assert _flips(0) == r0  # a pure function of (seed, epoch, rank, batch)
    assert [f for b in _flips(0, epoch=1) for _, f in b] != [f for b in r0 for _, f in b]
    assert _flips(0, start_batch=2) == r0[2:]  # a resumed epoch flips as the whole one
