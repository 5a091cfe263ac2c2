"""Timing contenders in short interleaved blocks, and the paired ratios read from them.

A GPU's speed drifts by tens of percent between runs and within one, so one long run per
contender can rank them wrongly. :func:`interleave` runs every contender in short blocks, in an
order rotated every round; :func:`paired_ratios` divides each block by the anchor's block of
the same round, and :func:`spread` summarises either.
"""

from __future__ import annotations

import statistics
import time
from typing import Mapping, NamedTuple, Sequence

import torch
from _timing import sync

__all__ = ["Interleaved", "Spread", "interleave", "paired_ratios", "spread"]


class Spread(NamedTuple):
    """Median, quartiles and range of ``n`` values."""

    median: float
    q1: float
    q3: float
    lo: float
    hi: float
    n: int


def spread(values: Sequence[float]) -> Spread:
    """:class:`Spread` of ``values`` (quartiles by linear interpolation, as numpy's default)."""
    if not values:
        raise ValueError("spread of no values")
    vals = sorted(values)
    q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else vals * 3
    return Spread(statistics.median(vals), q1, q3, vals[0], vals[-1], len(vals))


def paired_ratios(block_s: Mapping[str, Sequence[float]], anchor: str) -> dict:
    """Per block, each contender's time over the anchor's in the same round.

    Args:
        block_s: contender name -> its median step time of each round, all of one length.
        anchor: the name to divide by.

    Returns:
        ``{name: [ratio of round 0, round 1, ...]}`` for every contender but the anchor.
    """
    if anchor not in block_s:
        raise ValueError(f"anchor {anchor!r} is not a contender; got {sorted(block_s)}")
    base = block_s[anchor]
    out = {}
    for name, times in block_s.items():
        if len(times) != len(base):
            raise ValueError(f"{name} has {len(times)} blocks, {anchor} has {len(base)}")
        if name != anchor:
            out[name] = [t / b for t, b in zip(times, base)]
    return out


class Interleaved(NamedTuple):
    """Result of :func:`interleave`: per contender, the median step seconds of each block (one
    block per round, rounds in order), the number of hard triplets of each timed step, and the
    seconds of its first step (with ``torch.compile``, the compilation)."""

    block_s: dict
    n_hard: dict
    first_s: dict


def interleave(contenders: Mapping[str, tuple], args, device: torch.device) -> Interleaved:
    """Time the contenders in short alternating blocks rather than one long run each.

    ``args.warmup`` steps of each first; then ``args.blocks`` rounds, in each of which every
    contender runs ``args.block_steps`` steps, in an order rotated by one per round (ABC, BCA,
    CAB, ...), so a slow spell of the device (clocks, a neighbour) falls on all of them and
    none always runs first or after the same one.

    Args:
        contenders: name -> ``(step, batches)``: ``step(x, labels, step_number)`` (returns
            an output with ``metrics`` or None) and at least ``warmup + blocks * block_steps``
            ``(x, labels)`` batches, the same sequence for all, each in its contender's layout.
    """
    names = list(contenders)
    done = dict.fromkeys(names, 0)
    block_s = {name: [] for name in names}
    n_hard = {name: [] for name in names}
    first_s = {}

    def run(name: str, count: int, timed: bool) -> None:
        step_fn, batches = contenders[name]
        times = []
        for _ in range(count):
            x, labels = batches[done[name]]
            done[name] += 1
            sync(device)
            t0 = time.perf_counter()
            out = step_fn(x, labels, done[name])
            sync(device)
            times.append(time.perf_counter() - t0)
            first_s.setdefault(name, times[0])
            metrics = getattr(out, "metrics", {})
            if timed and "n_hard" in metrics:  # read after the clock stopped
                n_hard[name].append(float(metrics["n_hard"]))
        if timed:
            block_s[name].append(statistics.median(times))

    for name in names:
        run(name, args.warmup, timed=False)
    for round_ in range(args.blocks):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            run(name, args.block_steps, timed=True)
    return Interleaved(block_s, n_hard, first_s)
