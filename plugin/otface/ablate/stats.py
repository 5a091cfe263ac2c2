"""Statistics of an ablation: spread over seeds, and paired differences between configs.

Runs of two configs with the same seed share the data order and initial draws as far as the
configs allow, so their difference is measured pairwise, seed by seed: the mean of the
per-seed differences with a Student-t confidence interval on ``n - 1`` degrees of freedom, and
the smallest difference the run could have detected (its minimum detectable effect).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["SeedSummary", "PairedDifference", "summarize", "paired_difference"]


class SeedSummary(NamedTuple):
    """Mean and sample standard deviation (``ddof=1``; NaN for one seed) of ``n`` values."""

    mean: float
    std: float
    n: int


class PairedDifference(NamedTuple):
    """Mean of per-seed differences ``b - a`` with its ``confidence`` interval ``[low, high]``,
    and ``detectable``: the smallest true difference that a paired t-test at the same level
    would detect with probability ``power``, given the measured spread of the differences.

    ``low``, ``high`` and ``detectable`` are NaN when fewer than two seeds are paired.
    """

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    detectable: float = math.nan
    power: float = 0.8


def summarize(values: Sequence[float]) -> SeedSummary:
    """Mean and sample std of the finite ``values`` (one per seed)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return SeedSummary(math.nan, math.nan, 0)
    std = float(v.std(ddof=1)) if v.size > 1 else math.nan
    return SeedSummary(float(v.mean()), std, int(v.size))


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, power: float = 0.8
) -> PairedDifference:
    """Paired difference ``b - a`` over seeds (element ``i`` of both is seed ``i``).

    Pairs where either value is missing (NaN) are left out. The interval is
    ``mean ± t_{(1 + confidence) / 2, n - 1} · sd / sqrt(n)`` with ``sd`` the sample standard
    deviation of the differences. The detectable difference at ``power`` is
    ``(t_{(1 + confidence) / 2, n - 1} + t_{power, n - 1}) · sd / sqrt(n)`` (the usual
    approximation for a two-sided paired t-test, with the measured ``sd`` taken as the true
    one): a "no difference" finding says only that the true difference is likely below it.

    Raises:
        ValueError: ``a`` and ``b`` differ in length, or ``confidence`` is not in (0, 1).
    """
    from scipy.stats import t as student_t

    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.size} and {b.size}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    d = (b - a)[np.isfinite(a) & np.isfinite(b)]
    n = int(d.size)
    if n == 0:
        return PairedDifference(math.nan, math.nan, math.nan, 0, confidence, power=power)
    mean = float(d.mean())
    if n < 2:
        return PairedDifference(mean, math.nan, math.nan, n, confidence, power=power)
    se = float(d.std(ddof=1)) / math.sqrt(n)
    t_level = float(student_t.ppf(0.5 + confidence / 2, n - 1))
    half = t_level * se
    detectable = (t_level + float(student_t.ppf(power, n - 1))) * se
    return PairedDifference(mean, mean - half, mean + half, n, confidence, detectable, power)
