"""IJB-B / IJB-C 1:N identification: CMC ranks and TPIR at fixed FPIR, as in InsightFace.

The two galleries (G1 and G2, or S1 and S2) are joined into one, as InsightFace's
``ijb_1n.py`` does, and every probe template is scored against every gallery template by
cosine: one ``(P, G)`` matrix product of the pooled, unit-norm template features. A probe whose
subject has a gallery template is *mated*; its mate is that template.

Ranks
    The rank of a mated probe is 1 + the number of other gallery templates that score at least
    as high as its mate (a tie counts against the probe; with real-valued features ties do not
    occur and this is upstream's ``argsort`` reading). Rank-k is the fraction of mated probes of
    rank <= k; the CMC curve is rank-k for every k.

TPIR at FPIR, ``fpir_method="arcface_torch"`` (default)
    The mated score of each probe is set aside and every remaining score goes into one pool.
    The threshold is the ``ceil(n_probes * FPIR)``-th largest score of the pool; TPIR is the
    fraction of mated probes whose mated score is above it. Published arcface_torch-family
    tables are read this way.

TPIR at FPIR, ``fpir_method="nist"``
    Each probe contributes one score, its highest non-mated score (the best candidate of a
    search that does not contain its subject). The threshold is the ``ceil(n_probes * FPIR)``-th
    largest of these, so FPIR is the fraction of searches that would raise a false alarm; TPIR
    is the fraction of mated probes whose mate is at rank 1 *and* scores above the threshold.

On the real IJB-B/C lists every probe is mated (InsightFace's script refuses otherwise). Lists
with non-mated probes, as the demo set has, are accepted: their scores are all non-mated,
``n_probes`` counts them, and ranks and TPIR are fractions of the mated probes only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence, Union

import numpy as np

from otface.evaluation.ijb import TemplateFeatures, save_curves, text_table
from otface.evaluation.ijb_meta import IJB1NMeta

__all__ = [
    "DEFAULT_FPIRS",
    "DEFAULT_RANKS",
    "FPIR_METHODS",
    "IdentificationResult",
    "evaluate_identification",
    "format_1n_table",
    "identification_metrics",
    "identification_result",
    "mate_indices",
    "save_cmc_plot",
    "template_rows",
]

DEFAULT_RANKS = (1, 5, 10)
DEFAULT_FPIRS = (0.01, 0.1)
FPIR_METHODS = ("arcface_torch", "nist")
FEW_NONMATED = 10
"""A TPIR whose threshold is the k-th largest score with k below this is marked in the table."""

PathLike = Union[str, Path]


class IdentificationResult(NamedTuple):
    """Result of one 1:N run.

    Attributes:
        target: e.g. ``"IJBC"``; fpir_method: how TPIR was read.
        ranks: ``(R,)`` the ranks of the table; rank_rates: ``(R,)`` fraction of mated probes
            with their mate within each rank.
        fpirs: ``(F,)``; tpirs: ``(F,)`` TPIR at each; thresholds: ``(F,)`` the score thresholds;
            threshold_order: ``(F,)`` k, the threshold being the k-th largest non-mated score.
        cmc: ``(G,)`` identification rate at rank 1 … G.
        similarity: ``(P, G)`` score of each probe against each gallery template: float32
            cosines, or float64 re-scored ones (:mod:`otface.evaluation.ijb_rerank`).
        mates: ``(P,)`` column of each probe's mate, -1 for non-mated probes.
        probe_templates, gallery_templates: ids of the rows and columns.
    """

    target: str
    fpir_method: str
    ranks: np.ndarray
    rank_rates: np.ndarray
    fpirs: np.ndarray
    tpirs: np.ndarray
    thresholds: np.ndarray
    threshold_order: np.ndarray
    cmc: np.ndarray
    similarity: np.ndarray
    mates: np.ndarray
    probe_templates: np.ndarray
    gallery_templates: np.ndarray

    @property
    def num_mated(self) -> int:
        return int(np.sum(self.mates >= 0))


def mate_indices(probe_subjects: np.ndarray, gallery_subjects: np.ndarray) -> np.ndarray:
    """``(P,)`` index of the gallery template of each probe's subject, -1 when it has none.

    ``gallery_subjects`` must not repeat a subject.
    """
    gallery_subjects = np.asarray(gallery_subjects)
    order = np.argsort(gallery_subjects, kind="stable")
    sorted_subjects = gallery_subjects[order]
    if np.any(sorted_subjects[1:] == sorted_subjects[:-1]):
        raise ValueError("a subject has more than one gallery template")
    pos = np.clip(np.searchsorted(sorted_subjects, probe_subjects), 0, len(order) - 1)
    found = sorted_subjects[pos] == probe_subjects
    return np.where(found, order[pos], -1).astype(np.int64)


def _kth_largest(values: np.ndarray, k: int) -> float:
    if not 1 <= k <= len(values):
        raise ValueError(
            f"the threshold is the {k}-th largest non-mated score, but there are {len(values)}"
        )
    return float(np.partition(values, len(values) - k)[len(values) - k])


def identification_metrics(
    similarity: np.ndarray,
    mates: np.ndarray,
    *,
    ranks: Sequence[int] = DEFAULT_RANKS,
    fpirs: Sequence[float] = DEFAULT_FPIRS,
    fpir_method: str = "arcface_torch",
) -> tuple:
    """Ranks, CMC and TPIR at FPIR from a score matrix (definitions in the module docstring).

    Args:
        similarity: ``(P, G)`` probe-against-gallery scores.
        mates: ``(P,)`` column of each probe's mate, -1 for a non-mated probe.

    Returns:
        ``(rank_rates (R,), cmc (G,), tpirs (F,), thresholds (F,), orders (F,))``.

    Raises:
        ValueError: an unknown ``fpir_method``, no mated probe, or an FPIR that asks for more
            non-mated scores than there are.
    """
    if fpir_method not in FPIR_METHODS:
        raise ValueError(f"fpir_method must be one of {FPIR_METHODS}, got {fpir_method!r}")
    sim = np.asarray(similarity)
    mates = np.asarray(mates, np.int64)
    n_probes, n_gallery = sim.shape
    mated = np.flatnonzero(mates >= 0)
    if len(mated) == 0:
        raise ValueError("no probe has a mate in the gallery: ranks and TPIR are undefined")
    mated_scores = sim[mated, mates[mated]]
    nonmated = np.ones(sim.shape, bool)
    nonmated[mated, mates[mated]] = False
    # Rank: 1 + other gallery templates scoring >= the mate (ties count against the probe).
    ahead = np.sum((sim[mated] >= mated_scores[:, None]) & nonmated[mated], axis=1)
    rank_of = 1 + ahead
    cmc = np.cumsum(np.bincount(rank_of, minlength=n_gallery + 1)[1:]) / len(mated)
    rank_rates = np.asarray([cmc[min(r, n_gallery) - 1] for r in ranks], np.float64)
    orders = np.asarray([math.ceil(n_probes * f) for f in fpirs], np.int64)
    if fpir_method == "arcface_torch":
        pool = sim[nonmated]
        hits = np.ones(len(mated), bool)
    else:
        pool = np.where(nonmated, sim, -np.inf).max(axis=1)
        hits = rank_of == 1
    thresholds = np.asarray([_kth_largest(pool, int(k)) for k in orders], np.float64)
    tpirs = np.asarray(
        [np.sum(hits & (mated_scores > t)) / len(mated) for t in thresholds], np.float64
    )
    return rank_rates, cmc, tpirs, thresholds, orders


def template_rows(features: TemplateFeatures, templates: np.ndarray, what: str) -> np.ndarray:
    """Rows of ``features`` for ``templates``; a template without a pooled feature is an error."""
    index = np.clip(np.searchsorted(features.templates, templates), 0, len(features.templates) - 1)
    bad = features.templates[index] != templates
    if bad.any():
        raise ValueError(f"{what} template {int(templates[bad][0])} has no pooled feature")
    return index


def evaluate_identification(
    pooled: TemplateFeatures,
    meta: IJB1NMeta,
    target: str,
    *,
    ranks: Sequence[int] = DEFAULT_RANKS,
    fpirs: Sequence[float] = DEFAULT_FPIRS,
    fpir_method: str = "arcface_torch",
) -> IdentificationResult:
    """Scores the probes of ``meta`` against its two galleries joined (one matrix product)."""
    g_templates = np.concatenate([g[1] for g in meta.galleries])
    g_subjects = np.concatenate([g[2] for g in meta.galleries])
    order = np.argsort(g_templates, kind="stable")  # one gallery sorted by id, as upstream's
    g_templates, g_subjects = g_templates[order], g_subjects[order]
    gallery = pooled.features[template_rows(pooled, g_templates, "gallery")]
    probes = pooled.features[template_rows(pooled, meta.probe_templates, "probe")]
    similarity = probes @ gallery.T
    return identification_result(
        similarity,
        mate_indices(meta.probe_subjects, g_subjects),
        target,
        probe_templates=meta.probe_templates,
        gallery_templates=g_templates,
        ranks=ranks,
        fpirs=fpirs,
        fpir_method=fpir_method,
    )


def identification_result(
    similarity: np.ndarray,
    mates: np.ndarray,
    target: str,
    *,
    probe_templates: np.ndarray,
    gallery_templates: np.ndarray,
    ranks: Sequence[int] = DEFAULT_RANKS,
    fpirs: Sequence[float] = DEFAULT_FPIRS,
    fpir_method: str = "arcface_torch",
) -> IdentificationResult:
    """The 1:N result of a score matrix ``(P, G)`` (stage 1's cosines, or re-scored ones)."""
    rank_rates, cmc, tpirs, thresholds, orders = identification_metrics(
        similarity, mates, ranks=ranks, fpirs=fpirs, fpir_method=fpir_method
    )
    if similarity.dtype != np.float64:
        similarity = similarity.astype(np.float32, copy=False)
    return IdentificationResult(
        target=target,
        fpir_method=fpir_method,
        ranks=np.asarray(ranks, np.int64),
        rank_rates=rank_rates,
        fpirs=np.asarray(fpirs, np.float64),
        tpirs=tpirs,
        thresholds=thresholds,
        threshold_order=orders,
        cmc=cmc,
        similarity=similarity,
        mates=mates,
        probe_templates=probe_templates,
        gallery_templates=gallery_templates,
    )


def format_1n_table(results: Dict[str, IdentificationResult]) -> str:
    """Text table of rank-k and TPIR (%) at each FPIR, one row per named result.

    A TPIR whose threshold is the k-th largest non-mated score with k below
    :data:`FEW_NONMATED` is marked ``*``: it rests on a handful of scores.
    """
    first = next(iter(results.values()))
    header = ["Methods"] + [f"Rank-{r}" for r in first.ranks]
    header += [f"TPIR@FPIR={f:.0e}" for f in first.fpirs]
    rows: List[List[str]] = [header]
    marked = False
    for name, res in results.items():
        cells = [f"{100 * v:.2f}" for v in res.rank_rates]
        for tpir, k in zip(res.tpirs, res.threshold_order):
            few = k < FEW_NONMATED
            marked |= few
            cells.append(f"{100 * tpir:.2f}" + ("*" if few else ""))
        rows.append([f"{name}-{res.target}"] + cells)
    table = text_table(rows)
    table.append(
        f"TPIR read as {first.fpir_method}; {len(first.mates)} probe templates "
        f"({first.num_mated} mated), {len(first.gallery_templates)} gallery templates"
    )
    if marked:
        table.append(f"* the threshold is the k-th largest non-mated score with k < {FEW_NONMATED}")
    return "\n".join(table)


def save_cmc_plot(results: Dict[str, IdentificationResult], path_stem: PathLike) -> List[Path]:
    """Writes ``<stem>.png`` and ``<stem>.pdf`` (CMC curve); returns [] without matplotlib."""
    curves = [
        (np.arange(1, len(r.cmc) + 1), 100 * r.cmc, f"{name} (rank-1 {100 * r.cmc[0]:.2f}%)")
        for name, r in results.items()
    ]
    target = next(iter(results.values())).target
    return save_curves(
        curves,
        path_stem,
        title=f"CMC on {target} (1:N)",
        what="CMC",
        xscale="log",
        xlabel="rank",
        ylabel="identification rate (%)",
        ylim=(0, 100),
    )
