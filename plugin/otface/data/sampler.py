"""Distributed-aware batch samplers: identity-balanced P×K and arcface_torch's uniform shuffle.

Both yield lists of dataset indices (use them as ``DataLoader(batch_sampler=...)``), take
``rank`` and ``world_size`` explicitly (no process group needed), draw from
``numpy.random.default_rng(seed + epoch)`` (never the global RNG), and yield exactly
``num_image // (batch_size * world_size)`` batches per epoch on every rank, the step count of
arcface_torch's learning-rate schedule. ``set_epoch(epoch, start_batch=s)`` makes the next
iteration skip its first ``s`` batches without producing their indices (a resumed run).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["FlipBatchSampler", "PKBatchSampler", "UniformBatchSampler", "num_batches_per_epoch"]


def num_batches_per_epoch(num_image: int, *, batch_size: int, world_size: int) -> int:
    """``num_image // (batch_size * world_size)``, checked to be at least 1."""
    n = int(num_image) // (int(batch_size) * int(world_size))
    if n < 1:
        raise ValueError(
            f"num_image={num_image} is smaller than one global batch (batch_size={batch_size} x "
            f"world_size={world_size}); no step would run"
        )
    return n


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class _EpochBatchSampler(Sampler):
    """Shared epoch / resume bookkeeping."""

    def __init__(self, *, num_batches: int, seed: int) -> None:
        self.num_batches = num_batches
        self.seed = int(seed)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch's order; the next iteration starts at batch ``start_batch``."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(
                f"start_batch must be in [0, {self.num_batches}] (batches per epoch), "
                f"got {start_batch}"
            )
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def __len__(self) -> int:
        return self.num_batches


class UniformBatchSampler(_EpochBatchSampler):
    """arcface_torch's order: shuffle all indices by ``seed + epoch``, split across ranks by
    stride (``rank::world_size``), drop the last incomplete batch.

    Args:
        num_samples: dataset length.
        batch_size: images per rank and step.
        rank, world_size: this process and the number of processes.
        seed: base seed.
        num_image: sets the number of batches per epoch (defaults to ``num_samples``); when it
            exceeds ``num_samples`` further permutations are appended.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_image: int | None = None,
    ) -> None:
        _check_rank(rank, world_size)
        if batch_size < 1 or num_samples < 1:
            raise ValueError(
                f"need batch_size >= 1 and a non-empty dataset, got batch_size={batch_size}, "
                f"num_samples={num_samples}"
            )
        num_image = num_samples if num_image is None else num_image
        super().__init__(
            num_batches=num_batches_per_epoch(
                num_image, batch_size=batch_size, world_size=world_size
            ),
            seed=seed,
        )
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        need = self.num_batches * self.batch_size * self.world_size
        perms = [rng.permutation(self.num_samples) for _ in range(-(-need // self.num_samples))]
        mine = np.concatenate(perms)[:need][self.rank :: self.world_size]
        for b in range(self.start_batch, self.num_batches):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size].tolist()


class PKBatchSampler(_EpochBatchSampler):
    """Identity-balanced batches: each rank gets ``P = batch_size // k`` identities × ``k`` images.

    Each global step draws ``P * world_size`` distinct identities, split by rank, so ranks never
    share an identity within a step. Per epoch, every identity's images are shuffled and cut into
    groups of ``k`` (a remainder smaller than ``k`` waits for a later epoch); an identity with
    fewer than ``k`` images forms one group completed by drawing its images with replacement.
    Groups are taken in a seeded random order, a group whose identity is already in the step is
    kept for the next step, and a new round of groups is made when they run out.

    Args:
        labels: int labels, one per dataset index, ``(N,)``.
        batch_size: images per rank and step; must be a multiple of ``k``.
        k: images per identity (``config.sampler.k``).
        rank, world_size: this process and the number of processes.
        seed: base seed.
        num_image: sets the number of batches per epoch (defaults to ``N``).

    Raises:
        ValueError: ``batch_size % k != 0``, or fewer than ``P * world_size`` identities.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        *,
        batch_size: int,
        k: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_image: int | None = None,
    ) -> None:
        _check_rank(rank, world_size)
        if k < 1 or batch_size < 1 or batch_size % k != 0:
            raise ValueError(
                f"the P x K sampler needs batch_size to be a positive multiple of sampler.k; got "
                f"batch_size={batch_size}, sampler.k={k}"
            )
        labels = np.asarray(labels, dtype=np.int64).ravel()
        if labels.size == 0:
            raise ValueError("the P x K sampler got an empty label array")
        num_image = labels.size if num_image is None else num_image
        super().__init__(
            num_batches=num_batches_per_epoch(
                num_image, batch_size=batch_size, world_size=world_size
            ),
            seed=seed,
        )
        self.batch_size, self.k, self.p = int(batch_size), int(k), int(batch_size) // int(k)
        self.rank, self.world_size = int(rank), int(world_size)
        # Indices grouped by identity: _order[_start[j] : _start[j] + _count[j]] is identity j.
        self._order = np.argsort(labels, kind="stable")
        self.identities, self._start, self._count = np.unique(
            labels[self._order], return_index=True, return_counts=True
        )
        needed = self.p * self.world_size
        if self.identities.size < needed:
            raise ValueError(
                f"the P x K sampler needs at least P * world_size = {self.p} * {self.world_size} "
                f"= {needed} identities (batch_size={batch_size} // sampler.k={k}), but the data "
                f"has {self.identities.size}"
            )
        few = int(np.count_nonzero(self._count < self.k))
        if few:
            warnings.warn(
                f"{few} of {self.identities.size} identities have fewer than sampler.k={self.k} "
                "images; their images are drawn with replacement",
                stacklevel=2,
            )

    def _groups(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One round: ``(identity position (G,), dataset indices (G, k))`` in random order."""
        count, start, k = self._count, self._start, self.k
        # Shuffle within identities: a random permutation, then a stable (radix) sort by identity.
        ident = np.repeat(np.arange(count.size), count)
        perm = rng.permutation(ident.size)
        shuffled = self._order[perm[np.argsort(ident[perm], kind="stable")]]
        rank_in_id = np.arange(ident.size) - start[ident]
        full = count // k
        keep = rank_in_id < (full * k)[ident]
        big_idx = shuffled[keep].reshape(-1, k)
        big_id = ident[keep][::k]
        small = np.flatnonzero(count < k)
        if small.size:
            c = count[small][:, None]
            pos = np.arange(k)[None, :]
            offs = np.where(pos < c, pos, rng.integers(0, c, size=(small.size, k)))
            small_idx = shuffled[start[small][:, None] + offs]
            big_idx = np.concatenate([big_idx, small_idx])
            big_id = np.concatenate([big_id, small])
        order = rng.permutation(big_id.size)
        return big_id[order], big_idx[order]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        lo, hi = self.rank * self.p, (self.rank + 1) * self.p
        for step, (group_idx, chosen) in enumerate(self._plan(rng)):
            if step >= self.start_batch:
                yield group_idx[chosen[lo:hi]].reshape(-1).tolist()

    def _plan(self, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per global step: (the round's group indices (G, k), the step's ``P * world_size``
        groups with distinct identities)."""
        per_step = self.p * self.world_size
        group_id, group_idx = self._groups(rng)
        pos = 0  # next group of the round's random order
        deferred: list[int] = []  # groups skipped because their identity was already taken
        for _ in range(self.num_batches):
            if not deferred and pos + per_step <= group_id.size:
                block = np.arange(pos, pos + per_step)
                if np.unique(group_id[block]).size == per_step:  # the common case
                    pos += per_step
                    yield group_idx, block
                    continue
            taken: set[int] = set()
            chosen: list[int] = []
            retry, deferred = deferred, []
            while len(chosen) < per_step:
                if retry:
                    g = retry.pop(0)
                elif pos < group_id.size:
                    g, pos = pos, pos + 1
                else:
                    # New round; this step restarts on it and leftovers of the old one are dropped.
                    group_id, group_idx = self._groups(rng)
                    pos, retry, deferred, taken, chosen = 0, [], [], set(), []
                    continue
                ident = int(group_id[g])
                if ident in taken:
                    deferred.append(g)
                else:
                    taken.add(ident)
                    chosen.append(g)
            deferred.extend(retry)
            yield group_idx, np.asarray(chosen)


class FlipBatchSampler(Sampler):
    """Adds a random left-right flip decision to every index of another batch sampler.

    Yields lists of ``(index, flip)`` pairs. ``flip`` comes from
    ``numpy.random.default_rng([seed, epoch, rank, batch])``: a pure function of the batch's
    position, not of which DataLoader worker decodes it or of an RNG that a resume would have
    to restore. So runs repeat with any ``num_workers``, ranks flip independently, and a resumed
    run flips exactly as the uninterrupted one.

    Args:
        batch_sampler: a :class:`PKBatchSampler` or :class:`UniformBatchSampler`.
        seed: base seed (the run's ``config.seed``).
        rank: this process's rank.
    """

    _STREAM = 0xF11B  # keeps the flips' numbers apart from the batch order's

    def __init__(self, batch_sampler: _EpochBatchSampler, *, seed: int, rank: int = 0) -> None:
        self.batch_sampler = batch_sampler
        self.seed = int(seed)
        self.rank = int(rank)

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch

    @property
    def start_batch(self) -> int:
        return self.batch_sampler.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.batch_sampler.set_epoch(epoch, start_batch=start_batch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        epoch = self.batch_sampler.epoch
        for b, batch in enumerate(self.batch_sampler, start=self.batch_sampler.start_batch):
            rng = np.random.default_rng([self._STREAM, self.seed, epoch, self.rank, b])
            flips = rng.random(len(batch)) < 0.5
            yield list(zip(batch, flips.tolist()))
