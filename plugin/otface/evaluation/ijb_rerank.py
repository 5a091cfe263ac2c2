"""OT re-scoring (stage 2) of IJB-B / IJB-C, for both protocols.

Stage 1 is the cosine of the pooled template embeddings (:mod:`otface.evaluation.ijb`).
Stage 2 scores a pair of templates with ``α · s_OT + (1 − α) · cos``, ``s_OT`` the
transport-weighted cosine between the two templates' *local* features
(:func:`otface.evaluation.rerank.ot_similarity`):

* 1:1: every listed template pair is re-scored;
* 1:N: each probe's ``k`` best gallery templates are re-scored
  (:func:`otface.evaluation.rerank.rerank_top_k`).

Template-level local features are pooled as the embeddings are: each face's L2-normalised
local features (plus those of its mirror image, mirrored back so that patches line up, with the
flip test), weighted by faceness when the embeddings are, averaged over the faces of a media,
summed over the medias of a template, then each patch L2-normalised. They are accumulated while
the faces are embedded, so memory holds ``templates × patches × channels`` float32 numbers and
never one set per face: at IJB-C's 23,124 templates with 512 channels, 2.3 GB for the 7×7 map
and 0.76 GB pooled to 4×4 (``benchmarks/bench_ijb_local.py`` measures it). The result is kept
(and cached) as float16.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from otface.evaluation.ijb import (
    FeatureOptions,
    IJBResult,
    TemplateFeatures,
    VerifyOptions,
    extract_features,
    pool_template_features,
    read_feature_cache,
    results_from_scores,
    template_features,
    write_feature_cache,
)
from otface.evaluation.ijb_1n import IdentificationResult, identification_result, template_rows
from otface.evaluation.ijb_meta import IJBMeta, read_ijb_meta
from otface.evaluation.rerank import RerankOptions, combine_scores, rerank_top_k, solve_rows

__all__ = [
    "TemplateLocal",
    "LocalPool",
    "template_features_with_local",
    "template_ot_scores",
    "rerank_verification",
    "rerank_identification",
]

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]

_OT_CHUNK = 2048  # template pairs per batched solve


class TemplateLocal(NamedTuple):
    """Template ids ``(T,)`` (sorted, as :class:`TemplateFeatures`) and their local features
    ``(T, P, C)`` float16, each patch unit-norm."""

    templates: np.ndarray
    local: np.ndarray


class LocalPool:
    """Accumulates template-level local features while the faces of ``meta`` are embedded.

    Args:
        meta: the target's faces (templates, medias, faceness).
        faceness: weight each face by its detector score, as the embeddings are.
    """

    def __init__(self, meta: IJBMeta, *, faceness: bool) -> None:
        keys = np.stack([np.asarray(meta.templates), np.asarray(meta.medias)], axis=1)
        _, group, per_group = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
        group = group.reshape(-1)
        # Media mean then template sum: face i enters its template with 1 / (faces of its media).
        weight = 1.0 / per_group[group]
        if faceness:
            weight = weight * np.asarray(meta.faceness, np.float64)
        self.weight = torch.from_numpy(weight.astype(np.float32))
        templates, row = np.unique(np.asarray(meta.templates), return_inverse=True)
        self.templates, self.row = templates, torch.from_numpy(row.reshape(-1).astype(np.int64))
        self._sum: Optional[torch.Tensor] = None

    def add(self, faces: np.ndarray, points: np.ndarray) -> None:
        """Adds ``points`` ``(B, P, C)``, the local features of faces ``faces`` ``(B,)``."""
        faces_t = torch.from_numpy(np.asarray(faces, np.int64))
        pts = torch.from_numpy(np.asarray(points, np.float32))
        if self._sum is None:
            self._sum = torch.zeros((len(self.templates),) + tuple(pts.shape[1:]))
        self._sum.index_add_(0, self.row[faces_t], pts * self.weight[faces_t, None, None])

    def result(self) -> TemplateLocal:
        """The pooled local features (the pool is spent: a second call is an error)."""
        if self._sum is None:
            raise ValueError("no local features were added")
        # In place: at IJB-C's size the sums are gigabytes, and this is their last use.
        self._sum.div_(self._sum.norm(dim=-1, keepdim=True).clamp_min_(1e-12))
        local, self._sum = self._sum.to(torch.float16).numpy(), None
        return TemplateLocal(self.templates, local)


def template_features_with_local(
    local_embedder,
    data_dir: PathLike,
    target: str,
    *,
    options: Optional[FeatureOptions] = None,
    cache_file: Optional[PathLike] = None,
    local_cache_file: Optional[PathLike] = None,
    stage1_embedder=None,
) -> Tuple[IJBMeta, TemplateFeatures, TemplateLocal]:
    """:func:`otface.evaluation.ijb.template_features` plus the template-level local features.

    One pass over the faces gives both (``local_embedder`` returns embeddings and local
    features); with both caches present nothing is extracted. The embedding cache is the one
    stage 1 reads and writes, so stage 1 is the same with and without re-scoring. Where the
    local features come from another model file than the embeddings (an ONNX model's
    ``_local.onnx``), pass the embeddings' own embedder as ``stage1_embedder``: stage 1 is then
    extracted by it, as without re-scoring, and the local pass keeps only local features.
    """
    options = options or FeatureOptions()
    if stage1_embedder is not None:
        meta, pooled = template_features(
            stage1_embedder, data_dir, target, options=options, cache_file=cache_file
        )
        local = None
        if local_cache_file is not None:
            local = _read_local_cache(Path(local_cache_file), meta)
        if local is None:
            local = _extract_local(local_embedder, meta, options, local_cache_file)[1]
        return meta, pooled, local
    meta = read_ijb_meta(data_dir, target)
    n = len(meta.image_names)
    feats = read_feature_cache(Path(cache_file), n) if cache_file is not None else None
    local = None
    if local_cache_file is not None:
        local = _read_local_cache(Path(local_cache_file), meta)
    if feats is None or local is None:
        feats, local = _extract_local(local_embedder, meta, options, local_cache_file)
        if cache_file is not None:
            write_feature_cache(Path(cache_file), feats)
    return meta, pool_template_features(meta, feats, faceness=options.faceness), local


def _extract_local(
    local_embedder, meta: IJBMeta, options: FeatureOptions, local_cache_file
) -> Tuple[np.ndarray, TemplateLocal]:
    """One pass over ``meta``'s faces: raw image features and pooled local features (cached
    in ``local_cache_file`` when given)."""
    pool = LocalPool(meta, faceness=options.faceness)
    feats = extract_features(
        local_embedder,
        meta,
        flip=options.flip,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        local_pool=pool,
    )
    local = pool.result()
    if local_cache_file is not None:
        write_feature_cache(Path(local_cache_file), local.local)
    return feats, local


def _read_local_cache(path: Path, meta: IJBMeta) -> Optional[TemplateLocal]:
    templates = np.unique(np.asarray(meta.templates))
    local = read_feature_cache(path, len(templates), ndim=3, kind="local feature", rows="templates")
    return None if local is None else TemplateLocal(templates, local)


def template_ot_scores(
    local: TemplateLocal,
    rows_a: np.ndarray,
    rows_b: np.ndarray,
    options: RerankOptions,
    *,
    device: Union[str, torch.device] = "cpu",
    chunk_size: int = _OT_CHUNK,
    label: str = "OT re-scoring",
) -> Tuple[np.ndarray, int]:
    """``s_OT`` ``(M,)`` float64 of the template pairs ``(rows_a[i], rows_b[i])`` (rows of
    ``local``), solved ``chunk_size`` pairs per batch; also the number of plans whose marginal
    error stayed above ``options.tol``."""
    score, error = solve_rows(
        local.local, rows_a, rows_b, options, device=device, chunk_size=chunk_size, label=label
    )
    return score, int((error > options.tol).sum())


def rerank_verification(
    meta: IJBMeta,
    pooled: TemplateFeatures,
    local: TemplateLocal,
    stage1: IJBResult,
    options: RerankOptions,
    *,
    verify: Optional[VerifyOptions] = None,
    device: Union[str, torch.device] = "cpu",
) -> Tuple[IJBResult, int]:
    """Stage 2 of the 1:1 protocol: every pair of ``meta`` re-scored; with the number of
    unconverged plans."""
    rows_a = template_rows(local, meta.pair_templates[:, 0], "pair")
    rows_b = template_rows(local, meta.pair_templates[:, 1], "pair")
    s_ot, unconverged = template_ot_scores(local, rows_a, rows_b, options, device=device)
    scores = combine_scores(stage1.scores, s_ot, options.alpha).astype(np.float32)
    result = results_from_scores(meta, pooled, stage1.target, scores, verify or VerifyOptions())
    return result, unconverged


def rerank_identification(
    stage1: IdentificationResult,
    local: TemplateLocal,
    options: RerankOptions,
    *,
    device: Union[str, torch.device] = "cpu",
) -> Tuple[IdentificationResult, int]:
    """Stage 2 of the 1:N protocol: each probe's ``options.k`` best gallery templates
    re-scored (the others keep their order below them); with the number of unconverged plans."""
    probe_rows = template_rows(local, stage1.probe_templates, "probe")
    gallery_rows = template_rows(local, stage1.gallery_templates, "gallery")
    unconverged = [0]

    def rescore(p, g, cos):
        s_ot, bad = template_ot_scores(
            local, probe_rows[p], gallery_rows[g], options, device=device, label="1:N re-scoring"
        )
        unconverged[0] += bad
        return combine_scores(cos, s_ot, options.alpha)

    similarity = stage1.similarity
    if options.alpha != 0.0:
        # float64: the block shift that keeps untouched entries below the re-scored ones is
        # finer than float32 resolves.
        similarity = rerank_top_k(stage1.similarity, options.k, rescore)
    result = identification_result(
        similarity,
        stage1.mates,
        stage1.target,
        probe_templates=stage1.probe_templates,
        gallery_templates=stage1.gallery_templates,
        ranks=stage1.ranks,
        fpirs=stage1.fpirs,
        fpir_method=stage1.fpir_method,
    )
    return result, unconverged[0]
