"""IJB-B / IJB-C 1:1 template verification (TAR at fixed FAR), as in arcface_torch.

Pipeline: five-point similarity alignment of each loose crop to 112×112 (as insightface's
``face_align.norm_crop``, the standard ArcFace template: :mod:`otface.evaluation.align`);
embedding, plus that of the mirror image (flip test); faceness weighting (default on); mean
over the faces of a media (photo or video), sum over the medias of a template, L2
normalisation; cosine score for every template pair, in chunks; TAR at FAR 1e-6 ... 1e-1 and
the ROC. 1:N identification over the same pooled features is in :mod:`otface.evaluation.ijb_1n`.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from otface.evaluation.align import align_face
from otface.evaluation.ijb_meta import IJBMeta, read_ijb_meta
from otface.evaluation.metrics import DEFAULT_FARS, l2_normalize, roc_curve, tar_at_far
from otface.evaluation.models import Embedder
from otface.evaluation.rerank import mirror_points
from otface.progress import Progress

__all__ = [
    "FeatureOptions",
    "VerifyOptions",
    "TemplateFeatures",
    "IJBResult",
    "align_face",
    "extract_features",
    "pool_templates",
    "score_pairs",
    "feature_cache_key",
    "read_feature_cache",
    "write_feature_cache",
    "pool_template_features",
    "results_from_scores",
    "template_features",
    "verify_templates",
    "evaluate_ijb",
    "format_table",
    "text_table",
    "save_curves",
    "save_roc_plot",
]

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]


@dataclass(frozen=True)
class FeatureOptions:
    """How the per-face features are made and pooled into template features.

    Attributes:
        flip: add the embedding of the mirrored face.
        faceness: multiply each face's feature by its detector score before pooling (on by
            default, as arcface_torch's IJB evaluation).
        batch_size: faces per embedder call.
        num_workers: image loading threads.
    """

    flip: bool = True
    faceness: bool = True
    batch_size: int = 128
    num_workers: int = 4


@dataclass(frozen=True)
class VerifyOptions:
    """How the 1:1 scores are computed and the ROC is read.

    Attributes:
        fars: FARs of the table.
        tar_method: how the ROC is read at each FAR (:func:`otface.evaluation.metrics.tar_at_far`):
            ``"arcface_torch"`` (its ``eval_ijbc.py`` table, comparable with published numbers)
            or ``"interp"`` (linear between the points of the full ROC).
        chunk_size: template pairs scored at a time.
    """

    fars: Sequence[float] = DEFAULT_FARS
    tar_method: str = "arcface_torch"
    chunk_size: int = 16384


class TemplateFeatures(NamedTuple):
    """Template ids ``(T,)`` (sorted) and their unit-norm features ``(T, D)``."""

    templates: np.ndarray
    features: np.ndarray


class IJBResult(NamedTuple):
    """Result of one IJB run.

    Attributes:
        target: e.g. ``"IJBC"``.
        fars: ``(K,)`` FARs of the table; tars: ``(K,)`` TAR at each (fractions).
        auc: area under the ROC.
        scores: ``(P,)`` cosine score of every template pair; labels: ``(P,)`` 0/1.
        num_faces, num_templates: counts in the meta files.
    """

    target: str
    fars: np.ndarray
    tars: np.ndarray
    auc: float
    scores: np.ndarray
    labels: np.ndarray
    num_faces: int
    num_templates: int


def _load_aligned(path: Path, landmarks: np.ndarray) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read IJB image {path} (missing or not an image)")
    aligned = align_face(img, landmarks)
    return np.ascontiguousarray(aligned[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC → RGB CHW


def extract_features(
    embedder: Embedder,
    meta: IJBMeta,
    *,
    flip: bool = True,
    batch_size: int = 128,
    num_workers: int = 4,
    local_pool=None,
) -> np.ndarray:
    """Embeds every face of ``meta``: ``f(x)`` or, with ``flip``, ``f(x) + f(mirror(x))``.

    With ``local_pool`` (a :class:`otface.evaluation.ijb_rerank.LocalPool`), ``embedder`` is a
    local embedder returning ``(embeddings, local features)``, and each face's local features
    (plus its mirror's, mirrored back) go into the pool.

    Returns:
        ``(N, D)`` float32 raw (unnormalised) image features, in meta order.
    """
    n = len(meta.image_names)
    feats: Optional[np.ndarray] = None
    progress = Progress(n, "IJB features")
    with progress, ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            batch = np.stack(
                list(
                    pool.map(
                        lambda i: _load_aligned(
                            meta.image_dir / meta.image_names[i], meta.landmarks[i]
                        ),
                        idx,
                    )
                )
            )
            if local_pool is None:
                out = embedder(batch)
                if flip:
                    out = out + embedder(np.ascontiguousarray(batch[..., ::-1]))
            else:
                out, points = embedder(batch)
                if flip:
                    out_m, points_m = embedder(np.ascontiguousarray(batch[..., ::-1]))
                    out, points = out + out_m, points + mirror_points(points_m)
                local_pool.add(np.asarray(idx), points)
            if feats is None:
                feats = np.empty((n, out.shape[1]), np.float32)
            feats[start : start + len(idx)] = out
            progress.update(start + len(idx))
            if (start // batch_size) % 50 == 0:
                logger.info("IJB features: %d / %d faces", start + len(idx), n)
    assert feats is not None  # n >= 1 is checked when the meta files are read
    return feats


def pool_templates(
    image_features: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> TemplateFeatures:
    """Media pooling, then template pooling.

    For each template: the mean of the features of each of its medias, summed over its medias,
    L2-normalised.

    Args:
        image_features: ``(N, D)`` per-face features (faceness weighting already applied).
        templates: ``(N,)`` template ids; medias: ``(N,)`` media ids.
    """
    feats = np.asarray(image_features, np.float32)  # IJB-C: 469k × 512, keep one copy small
    keys = np.stack([np.asarray(templates), np.asarray(medias)], axis=1)
    groups, group_of_face = np.unique(keys, axis=0, return_inverse=True)
    group_of_face = group_of_face.reshape(-1)
    order = np.argsort(group_of_face, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(group_of_face[order]) != 0])
    media_sum = np.add.reduceat(feats[order], starts, axis=0, dtype=np.float64)
    media_mean = media_sum / np.bincount(group_of_face)[:, None]
    # groups are sorted by (template, media): consecutive rows of one template are contiguous.
    uniq_templates, t_starts = np.unique(groups[:, 0], return_index=True)
    template_sum = np.add.reduceat(media_mean, t_starts, axis=0)
    return TemplateFeatures(uniq_templates, l2_normalize(template_sum).astype(np.float32))


def score_pairs(
    features: TemplateFeatures, pair_templates: np.ndarray, *, chunk_size: int = 16384
) -> np.ndarray:
    """Cosine score ``(P,)`` of each template pair ``(P, 2)``, ``chunk_size`` pairs at a time."""
    index = np.searchsorted(features.templates, pair_templates)
    index = np.clip(index, 0, len(features.templates) - 1)
    if not np.array_equal(features.templates[index], pair_templates):
        missing = pair_templates[features.templates[index] != pair_templates][0]
        raise ValueError(f"pair template {int(missing)} has no pooled feature")
    scores = np.empty(len(pair_templates), np.float32)
    for start in range(0, len(index), chunk_size):
        chunk = index[start : start + chunk_size]
        a, b = features.features[chunk[:, 0]], features.features[chunk[:, 1]]
        scores[start : start + len(chunk)] = np.einsum("ij,ij->i", a, b)
    return scores


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def feature_cache_key(
    model_path: PathLike, meta_file: PathLike, *, flip: bool, network: Optional[str]
) -> str:
    """Key of a feature cache (16 hex digits).

    It covers everything the features depend on: the model file's content (SHA-256, so a
    retrained ``model.pt`` at the same path misses), the backbone name it is loaded as (None for
    ONNX), the face list's size and mtime, and the flip setting.
    """
    meta_stat = Path(meta_file).stat()
    parts = [
        _file_digest(Path(model_path)),
        f"network={network}",
        str(meta_stat.st_size),
        str(meta_stat.st_mtime_ns),
        f"flip={int(flip)}",
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def read_feature_cache(
    cache_file: Path, n_rows: int, *, ndim: int = 2, kind: str = "feature", rows: str = "faces"
) -> Optional[np.ndarray]:
    """The cached array of ``n_rows`` rows and ``ndim`` dimensions (by default ``(n_faces, D)``
    features), or None, with a warning when the file exists but is unusable."""
    if not cache_file.is_file():
        return None
    try:
        array = np.load(cache_file)
    except (OSError, ValueError, EOFError) as exc:  # truncated or not an .npy file
        logger.warning("ignoring unreadable %s cache %s: %s", kind, cache_file, exc)
        return None
    if array.ndim != ndim or len(array) != n_rows:
        logger.warning(
            "ignoring %s cache %s: shape %s, %d %s", kind, cache_file, array.shape, n_rows, rows
        )
        return None
    logger.info("IJB %ss read from cache %s", kind, cache_file)
    return array


def write_feature_cache(cache_file: Path, array: np.ndarray) -> None:
    """Writes ``array`` to ``cache_file`` (``.npy``) through a temporary file, so a run stopped
    mid-write leaves no truncated cache."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(cache_file)


def pool_template_features(meta: IJBMeta, feats: np.ndarray, *, faceness: bool) -> TemplateFeatures:
    """Faceness weighting (when asked), then :func:`pool_templates`."""
    if faceness:
        feats = feats * meta.faceness[:, None]
    return pool_templates(feats, meta.templates, meta.medias)


def template_features(
    embedder: Optional[Embedder],
    data_dir: PathLike,
    target: str,
    *,
    options: FeatureOptions = FeatureOptions(),
    cache_file: Optional[PathLike] = None,
) -> Tuple[IJBMeta, TemplateFeatures]:
    """Reads a target's meta files and returns them with the pooled template features.

    The per-face features are read from ``cache_file`` when it holds them, else extracted with
    ``embedder`` and written there; both protocols (1:1 and 1:N) pool the same features, so one
    extraction serves both. Arguments as in :func:`evaluate_ijb`.
    """
    meta = read_ijb_meta(data_dir, target)
    n = len(meta.image_names)
    feats = read_feature_cache(Path(cache_file), n) if cache_file is not None else None
    if feats is None:
        if embedder is None:
            raise ValueError("no embedder given and no feature cache to read")
        feats = extract_features(
            embedder,
            meta,
            flip=options.flip,
            batch_size=options.batch_size,
            num_workers=options.num_workers,
        )
        if cache_file is not None:
            write_feature_cache(Path(cache_file), feats)
    return meta, pool_template_features(meta, feats, faceness=options.faceness)


def verify_templates(
    meta: IJBMeta,
    pooled: TemplateFeatures,
    target: str,
    *,
    options: VerifyOptions = VerifyOptions(),
) -> IJBResult:
    """The 1:1 protocol on pooled template features (see :func:`evaluate_ijb`)."""
    scores = score_pairs(pooled, meta.pair_templates, chunk_size=options.chunk_size)
    return results_from_scores(meta, pooled, target, scores, options)


def results_from_scores(
    meta: IJBMeta,
    pooled: TemplateFeatures,
    target: str,
    scores: np.ndarray,
    options: VerifyOptions = VerifyOptions(),
) -> IJBResult:
    """The 1:1 table (TAR at each FAR, AUC) of given scores ``(P,)`` of ``meta``'s pairs."""
    roc = roc_curve(scores, meta.pair_labels)
    fars = options.fars
    return IJBResult(
        target=target,
        fars=np.asarray(fars, np.float64),
        tars=tar_at_far(scores, meta.pair_labels, fars=fars, method=options.tar_method),
        auc=float(np.sum(np.diff(roc.far) * (roc.tar[1:] + roc.tar[:-1]) / 2)),
        scores=scores,
        labels=meta.pair_labels,
        num_faces=len(meta.image_names),
        num_templates=len(pooled.templates),
    )


def evaluate_ijb(
    embedder: Optional[Embedder],
    data_dir: PathLike,
    target: str,
    *,
    features: FeatureOptions = FeatureOptions(),
    verify: VerifyOptions = VerifyOptions(),
    cache_file: Optional[PathLike] = None,
) -> IJBResult:
    """Runs the IJB 1:1 protocol on ``data_dir`` for ``target``.

    Args:
        embedder: maps ``uint8`` RGB faces ``(N, 3, 112, 112)`` to ``(N, D)``; may be None when
            ``cache_file`` already exists.
        data_dir: folder in InsightFace's IJB release layout.
        target: ``"IJBB"``, ``"IJBC"`` (or any name with matching meta files).
        features: flip test, faceness weighting, batching (:class:`FeatureOptions`).
        verify: FARs, how TAR is read, chunking (:class:`VerifyOptions`).
        cache_file: ``.npy`` of the raw image features; read when present, written otherwise.
    """
    meta, pooled = template_features(
        embedder, data_dir, target, options=features, cache_file=cache_file
    )
    return verify_templates(meta, pooled, target, options=verify)


FEW_IMPOSTORS = 10
"""A TAR read at a FAR that fewer impostor pairs than this exceed is marked in the table."""


def text_table(rows: List[List[str]]) -> List[str]:
    """Lines of a ruled text table; ``rows[0]`` is the header, cells are right-aligned."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(row: List[str]) -> str:
        return "| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |"

    return [rule, line(rows[0]), rule, *map(line, rows[1:]), rule]


def format_table(results: Dict[str, IJBResult]) -> str:
    """Text table of TAR (%) at each FAR, one row per named result.

    A FAR times the number of impostor pairs is how many impostors the threshold lets through:
    below :data:`FEW_IMPOSTORS` the TAR is marked ``*`` (it rests on a handful of pairs), and
    below one no TAR is printed (``-``), with a note under the table.
    """
    first = next(iter(results.values()))
    header = ["Methods"] + [f"{far:.0e}" for far in first.fars]
    rows: List[List[str]] = [header]
    marked = False
    for name, res in results.items():
        impostors = int(np.sum(np.asarray(res.labels) == 0))
        cells = []
        for far, tar in zip(res.fars, res.tars):
            expected = far * impostors
            if expected < 1:
                cells.append("-")
                marked = True
            elif expected < FEW_IMPOSTORS:
                cells.append(f"{100 * tar:.2f}*")
                marked = True
            else:
                cells.append(f"{100 * tar:.2f}")
        rows.append([f"{name}-{res.target}"] + cells)
    table = text_table(rows)
    if marked:
        table.append(
            f"* rests on fewer than {FEW_IMPOSTORS} impostor pairs (FAR x impostor pairs); "
            "- : less than one impostor pair at that FAR, no TAR"
        )
    return "\n".join(table)


def save_curves(
    curves: List[tuple], path_stem: PathLike, *, title: str, what: str, **axes
) -> List[Path]:
    """Plots ``(x, y, label)`` curves and writes ``<stem>.png`` and ``<stem>.pdf``; without
    matplotlib, warns once that there is no ``what`` plot and returns []."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s plot (pip install matplotlib)", what)
        return []
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for x, y, label in curves:
        ax.plot(x, y, lw=1, label=label)
    ax.set(**axes)
    ax.set_title(title)
    ax.grid(linestyle="--", linewidth=0.5)
    ax.legend(loc="lower right")
    paths = [Path(f"{path_stem}.png"), Path(f"{path_stem}.pdf")]
    for path in paths:
        fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return paths


def save_roc_plot(results: Dict[str, IJBResult], path_stem: PathLike) -> List[Path]:
    """Writes ``<stem>.png`` and ``<stem>.pdf`` (log-FAR ROC); returns [] without matplotlib."""
    curves = []
    for name, res in results.items():
        roc = roc_curve(res.scores, res.labels)
        curves.append((roc.far, roc.tar, f"{name} (AUC {100 * res.auc:.2f}%)"))
    target = next(iter(results.values())).target
    return save_curves(
        curves,
        path_stem,
        title=f"ROC on {target}",
        what="ROC",
        xscale="log",
        xlim=(1e-6, 1),
        ylim=(0, 1),
        xlabel="FAR",
        ylabel="TAR",
    )
