"""Pair verification with OT re-scoring (stage 2) beside the cosine (stage 1), and accuracy by
condition where a set names its pairs' conditions.

A ``.bin`` set ``NAME.bin`` may have a sidecar ``NAME.conditions.txt`` with one word per pair
(the demo's ``demo_hard``: pose, occlusion, light; ``demo_crop``: the part of the face kept).
Each condition's accuracy is that of its pairs under the thresholds the whole set's 10-fold
protocol chose (:func:`otface.evaluation.metrics.subset_accuracy`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from otface.evaluation.bin_io import PairSet
from otface.evaluation.metrics import (
    kfold_accuracy_from_distances,
    mean_norm,
    pair_distances,
    subset_accuracy,
)
from otface.evaluation.rerank import RerankOptions, solve_rows
from otface.evaluation.verification import VerificationResult, distinct_rows, evaluate_embeddings
from otface.progress import Progress

__all__ = [
    "PairScores",
    "read_conditions",
    "pair_scores",
    "stage_results",
    "condition_accuracy",
]

_CHUNK = 256  # faces per forward chunk (their local features are kept)
_OT_CHUNK = 512  # pairs per batched solve


class PairScores(NamedTuple):
    """What stage 1 and stage 2 need of a pair set, computed once (α can then be swept).

    Attributes:
        embeddings, flipped: ``(2P, D)`` raw embeddings of the images and of their mirrors.
        issame: ``(P,)`` labels.
        s_ot: ``(P,)`` transport-weighted cosine of each pair's local features (None when the
            pairs were scored without re-scoring).
        ot_error: ``(P,)`` marginal error of each pair's plan (None likewise).
    """

    embeddings: np.ndarray
    flipped: Optional[np.ndarray]
    issame: np.ndarray
    s_ot: Optional[np.ndarray]
    ot_error: Optional[np.ndarray]


def read_conditions(bin_path: Path, n_pairs: int) -> Optional[np.ndarray]:
    """The sidecar ``<stem>.conditions.txt`` of a ``.bin`` as ``(P,)`` strings, or None.

    Raises:
        ValueError: the sidecar has another number of lines than the set has pairs.
    """
    path = Path(bin_path).with_name(f"{Path(bin_path).stem}.conditions.txt")
    if not path.is_file():
        return None
    words = path.read_text(encoding="utf-8").split()
    if len(words) != n_pairs:
        raise ValueError(f"{path} names {len(words)} conditions for {n_pairs} pairs")
    return np.asarray(words)


def pair_scores(
    embedder, pairs: PairSet, options: Optional[RerankOptions], *, flip: bool = True
) -> PairScores:
    """Embeds each distinct image once (and its mirror when ``flip``).

    With ``options``, ``embedder`` is a local embedder (:class:`LocalEmbedder` or its ONNX twin)
    whose local features are kept, and every pair's OT problem is solved. Without, it is a plain
    embedder and ``s_ot``/``ot_error`` are None (stage 1 and per-condition rows only).
    """
    first, inverse = distinct_rows(pairs.images)
    embeddings, flipped, local = [], [], []

    def embed(images):
        out = embedder(images)
        return out if options is not None else (out, None)

    with Progress(len(first), "verification images") as progress:
        for start in range(0, len(first), _CHUNK):
            chunk = pairs.images[first[start : start + _CHUNK]]
            emb, points = embed(chunk)
            embeddings.append(emb)
            local.append(points)
            if flip:
                flipped.append(embed(np.ascontiguousarray(chunk[..., ::-1]))[0])
            progress.update(start + len(chunk))
    s_ot, err = None, None
    if options is not None:
        s_ot, err = solve_rows(
            np.concatenate(local), inverse[0::2], inverse[1::2], options, chunk_size=_OT_CHUNK
        )
    return PairScores(
        np.concatenate(embeddings)[inverse],
        np.concatenate(flipped)[inverse] if flip else None,
        np.asarray(pairs.issame, dtype=bool),
        s_ot,
        err,
    )


def _distances(scores: PairScores, alpha: float) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Stage-2 squared distances, plain and with the flip test: ``(1 − α)·d + α·(2 − 2 s_OT)``,
    which is ``2 − 2·(α s_OT + (1 − α) cos)``; α = 0 leaves stage 1's distances exactly (and
    needs no ``s_OT``)."""
    if alpha != 0.0 and scores.s_ot is None:
        raise ValueError("stage 2 with alpha > 0 needs s_OT: score the pairs with rerank options")

    def mix(d):
        return d if alpha == 0.0 else (1.0 - alpha) * d + alpha * (2.0 - 2.0 * scores.s_ot)

    plain = pair_distances(scores.embeddings[0::2], scores.embeddings[1::2])
    if scores.flipped is None:
        return mix(plain), None
    fused = scores.embeddings.astype(np.float64) + scores.flipped.astype(np.float64)
    return mix(plain), mix(pair_distances(fused[0::2], fused[1::2]))


def stage_results(
    scores: PairScores, alpha: float, *, n_folds: int = 10
) -> Tuple[VerificationResult, VerificationResult]:
    """``(stage 1, stage 2)`` accuracies of a set; stage 1 equals :func:`evaluate_pairs`'s."""
    stage1 = evaluate_embeddings(
        scores.embeddings, scores.issame, flipped=scores.flipped, n_folds=n_folds
    )
    n_folds = min(n_folds, len(scores.issame))
    plain, fused = _distances(scores, alpha)
    a = kfold_accuracy_from_distances(plain, scores.issame, n_folds=n_folds)
    b = a if fused is None else kfold_accuracy_from_distances(fused, scores.issame, n_folds=n_folds)
    norms = (scores.embeddings,) if scores.flipped is None else (scores.embeddings, scores.flipped)
    stage2 = VerificationResult(a.mean, a.std, b.mean, b.std, mean_norm(*norms), len(scores.issame))
    return stage1, stage2


def condition_accuracy(
    scores: PairScores, conditions: np.ndarray, alpha: float, *, n_folds: int = 10
) -> Dict[str, Tuple[int, float, float]]:
    """``{condition: (pairs, stage-1 accuracy, stage-2 accuracy)}`` with the flip test (when
    the scores have it), each under the whole set's fold thresholds."""
    n_folds = min(n_folds, len(scores.issame))
    d1 = _distances(scores, 0.0)
    d2 = _distances(scores, alpha)
    stage1 = d1[1] if d1[1] is not None else d1[0]
    stage2 = d2[1] if d2[1] is not None else d2[0]
    thr1 = kfold_accuracy_from_distances(stage1, scores.issame, n_folds=n_folds).fold_threshold
    thr2 = kfold_accuracy_from_distances(stage2, scores.issame, n_folds=n_folds).fold_threshold
    out: Dict[str, Tuple[int, float, float]] = {}
    names: List[str] = sorted(set(conditions.tolist()))
    for name in names:
        subset = conditions == name
        out[name] = (
            int(subset.sum()),
            subset_accuracy(stage1, scores.issame, thr1, subset),
            subset_accuracy(stage2, scores.issame, thr2, subset),
        )
    return out
