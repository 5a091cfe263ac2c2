"""Verification metrics: k-fold pair accuracy (LFW protocol) and TAR at fixed FAR (IJB protocol).

Both are plain NumPy and work on embeddings or scores already computed.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

__all__ = [
    "KFoldAccuracy",
    "RocCurve",
    "DEFAULT_FARS",
    "TAR_METHODS",
    "l2_normalize",
    "kfold_accuracy",
    "kfold_accuracy_from_distances",
    "pair_distances",
    "subset_accuracy",
    "mean_norm",
    "roc_curve",
    "tar_at_far",
]

#: The FAR columns of the IJB-B/IJB-C table.
DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


class KFoldAccuracy(NamedTuple):
    """Result of :func:`kfold_accuracy`.

    Attributes:
        mean: mean test-fold accuracy.
        std: population standard deviation of the fold accuracies.
        fold_accuracy: ``(n_folds,)`` accuracy on each test fold.
        fold_threshold: ``(n_folds,)`` squared-distance threshold chosen on the training folds.
    """

    mean: float
    std: float
    fold_accuracy: np.ndarray
    fold_threshold: np.ndarray


class RocCurve(NamedTuple):
    """ROC points sorted by increasing FAR: ``far``, ``tar``, ``threshold`` (each ``(K,)``)."""

    far: np.ndarray
    tar: np.ndarray
    threshold: np.ndarray


def l2_normalize(x: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of ``(N, D)``; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def mean_norm(*embeddings: np.ndarray) -> float:
    """Mean L2 norm of the rows of all given ``(N, D)`` arrays (arcface_torch's ``XNorm``)."""
    norms = np.concatenate([np.linalg.norm(np.asarray(e, np.float64), axis=1) for e in embeddings])
    return float(norms.mean())


def _fold_slices(n: int, n_folds: int) -> list:
    # Contiguous folds, the first ``n % n_folds`` one larger (sklearn KFold without shuffling).
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    ends = np.cumsum(sizes)
    return [np.arange(end - size, end) for size, end in zip(sizes, ends)]


def _correct_counts(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    # Pairs predicted "same" when dist < threshold; correct = TP + TN for every threshold.
    pos = np.sort(dist[issame])
    neg = np.sort(dist[~issame])
    tp = np.searchsorted(pos, thresholds, side="left")
    tn = len(neg) - np.searchsorted(neg, thresholds, side="left")
    return tp + tn


def kfold_accuracy(
    embeddings1: np.ndarray,
    embeddings2: np.ndarray,
    issame: np.ndarray,
    *,
    n_folds: int = 10,
    thresholds: Optional[np.ndarray] = None,
) -> KFoldAccuracy:
    """LFW-protocol accuracy: threshold picked on ``n_folds - 1`` folds, scored on the rest.

    Embeddings are L2-normalised; a pair is called "same" when the squared distance
    ``||e1 - e2||^2 < threshold``. For each test fold the threshold with the highest accuracy on
    the other folds (the first one on ties) is applied to the test fold. Folds are contiguous
    and unshuffled, as in arcface_torch.

    Args:
        embeddings1: ``(P, D)`` first image of each pair.
        embeddings2: ``(P, D)`` second image of each pair.
        issame: ``(P,)`` bool labels.
        n_folds: number of folds (2 ≤ n_folds ≤ P).
        thresholds: candidate squared-distance thresholds; default ``0, 0.01, ..., 3.99``.
    """
    e1, e2 = np.shape(embeddings1), np.shape(embeddings2)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if e1 != e2 or len(e1) != 2 or e1[0] != issame.shape[0]:
        raise ValueError(
            f"shapes disagree: embeddings1 {e1}, embeddings2 {e2}, issame {issame.shape}"
        )
    return kfold_accuracy_from_distances(
        pair_distances(embeddings1, embeddings2), issame, n_folds=n_folds, thresholds=thresholds
    )


def pair_distances(embeddings1: np.ndarray, embeddings2: np.ndarray) -> np.ndarray:
    """``(P,)`` squared distances ``||e1 - e2||²`` of the L2-normalised rows (``2 − 2 cos``)."""
    e1, e2 = l2_normalize(embeddings1), l2_normalize(embeddings2)
    return np.sum((e1 - e2) ** 2, axis=1)


def kfold_accuracy_from_distances(
    dist: np.ndarray,
    issame: np.ndarray,
    *,
    n_folds: int = 10,
    thresholds: Optional[np.ndarray] = None,
) -> KFoldAccuracy:
    """:func:`kfold_accuracy` on given squared distances ``(P,)`` (any score ``s`` in [-1, 1]
    enters as ``2 − 2 s``)."""
    dist = np.asarray(dist, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if dist.shape != issame.shape:
        raise ValueError(f"shapes disagree: distances {dist.shape}, issame {issame.shape}")
    if not 2 <= n_folds <= len(issame):
        raise ValueError(f"n_folds must be in [2, {len(issame)}] (number of pairs), got {n_folds}")
    if thresholds is None:
        thresholds = np.arange(0.0, 4.0, 0.01)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    fold_acc = np.zeros(n_folds)
    fold_thr = np.zeros(n_folds)
    for k, test in enumerate(_fold_slices(len(dist), n_folds)):
        train = np.ones(len(dist), dtype=bool)
        train[test] = False
        best = int(np.argmax(_correct_counts(dist[train], issame[train], thresholds)))
        fold_thr[k] = thresholds[best]
        correct = _correct_counts(dist[test], issame[test], thresholds[best : best + 1])[0]
        fold_acc[k] = correct / len(test)
    return KFoldAccuracy(float(fold_acc.mean()), float(fold_acc.std()), fold_acc, fold_thr)


def subset_accuracy(
    dist: np.ndarray, issame: np.ndarray, fold_threshold: np.ndarray, subset: np.ndarray
) -> float:
    """Accuracy on the pairs ``subset`` (bool ``(P,)``), each judged with the threshold its
    test fold got from the whole set (:attr:`KFoldAccuracy.fold_threshold`): the share of one
    condition's pairs that the set's own protocol gets right."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    correct = 0
    for k, test in enumerate(_fold_slices(len(dist), len(fold_threshold))):
        keep = test[np.asarray(subset, dtype=bool)[test]]
        said_same = dist[keep] < fold_threshold[k]
        correct += int(np.sum(said_same == issame[keep]))
    total = int(np.sum(subset))
    return correct / total if total else float("nan")


def roc_curve(
    scores: np.ndarray, labels: np.ndarray, *, drop_intermediate: bool = False
) -> RocCurve:
    """ROC of similarity scores (higher = more alike), one point per distinct threshold.

    A pair is accepted when ``score >= threshold``. The first point is ``(0, 0)`` at threshold
    ``+inf``.

    Args:
        scores: ``(P,)`` similarity scores.
        labels: ``(P,)`` 1 for genuine (same identity), 0 for impostor pairs.
        drop_intermediate: drop the thresholds whose step in (impostor, genuine) counts equals
            the step after them, i.e. points in the middle of a straight run of equal steps.
            This is the rule of ``sklearn.metrics.roc_curve`` (its default), which
            arcface_torch's IJB evaluation relies on; the origin and the first and last
            thresholds are always kept.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in length")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"need genuine and impostor pairs, got {n_pos} and {n_neg}")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_run = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_run]
    fp = np.cumsum(~y)[last_of_run]
    threshold = s[last_of_run]
    if drop_intermediate and len(tp) > 2:
        corner = (np.diff(tp, 2) != 0) | (np.diff(fp, 2) != 0)
        keep = np.r_[True, corner, True]
        tp, fp, threshold = tp[keep], fp[keep], threshold[keep]
    far = np.r_[0.0, fp / n_neg]
    tar = np.r_[0.0, tp / n_pos]
    return RocCurve(far=far, tar=tar, threshold=np.r_[np.inf, threshold])


#: The ways :func:`tar_at_far` reads the ROC; the first is the default.
TAR_METHODS = ("arcface_torch", "interp")


def tar_at_far(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    fars: Sequence[float] = DEFAULT_FARS,
    method: str = "arcface_torch",
) -> np.ndarray:
    """True-accept rate at each false-accept rate in ``fars``.

    ``method="arcface_torch"`` (default) reproduces the table of arcface_torch's
    ``eval_ijbc.py``: the ROC thinned as ``sklearn.metrics.roc_curve`` thins it by default
    (``drop_intermediate``), then the TAR of the remaining point whose FAR is closest to the
    target; on a tie, the point later on the ROC (larger FAR, then larger TAR). Published
    arcface_torch IJB-B/C numbers are read this way.

    ``method="interp"``: the full ROC polyline read at each FAR, linearly between its points;
    where the ROC rises vertically at that FAR, its top. It reads the TAR at the target FAR
    itself, so it differs from the arcface_torch reading wherever the nearest kept point lies
    off the target (on a small set, often far off).

    Args:
        scores: ``(P,)`` similarity scores; labels: ``(P,)`` 1 genuine / 0 impostor.
        fars: target FARs in [0, 1].
        method: one of :data:`TAR_METHODS`.

    Returns:
        ``(len(fars),)`` TAR values in [0, 1].
    """
    if method not in TAR_METHODS:
        raise ValueError(f"method must be one of {TAR_METHODS}, got {method!r}")
    fars = np.asarray(fars, dtype=np.float64).reshape(-1)
    if np.any((fars < 0) | (fars > 1)):
        raise ValueError(f"fars must lie in [0, 1], got {fars.tolist()}")
    out = np.empty(len(fars))
    if method == "arcface_torch":
        roc = roc_curve(scores, labels, drop_intermediate=True)
        for i, target in enumerate(fars):
            gap = np.abs(roc.far - target)
            out[i] = roc.tar[np.flatnonzero(gap == gap.min())[-1]]
        return out
    roc = roc_curve(scores, labels)
    # First ROC point beyond each target; the one before it is the top of the run at or left of
    # the target, and the segment between them is the polyline there.
    right = np.searchsorted(roc.far, fars, side="right")
    for i, (target, j) in enumerate(zip(fars, right)):
        if j >= len(roc.far) or roc.far[j - 1] == target:
            out[i] = roc.tar[j - 1]
            continue
        x0, x1, y0, y1 = roc.far[j - 1], roc.far[j], roc.tar[j - 1], roc.tar[j]
        out[i] = y0 + (y1 - y0) * (target - x0) / (x1 - x0)
    return out
