"""Template-level local features for IJB re-scoring: pooled as the embeddings are (checked by
hand on a small layout), and mirrored-image patches lined up with the original's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from otface.evaluation.ijb import TemplateFeatures, verify_templates
from otface.evaluation.ijb_1n import identification_result
from otface.evaluation.ijb_meta import IJBMeta
from otface.evaluation.ijb_rerank import (
    LocalPool,
    TemplateLocal,
    rerank_identification,
    rerank_verification,
)
from otface.evaluation.rerank import RerankOptions, local_points, mirror_points


def _meta(templates, medias, faceness):
    n = len(templates)
    return IJBMeta(
        image_names=[f"{i}.jpg" for i in range(n)],
        landmarks=np.zeros((n, 5, 2), np.float32),
        faceness=np.asarray(faceness, np.float32),
        templates=np.asarray(templates, np.int64),
        medias=np.asarray(medias, np.int64),
        pair_templates=np.zeros((0, 2), np.int64),
        pair_labels=np.zeros(0, np.int64),
        image_dir=Path("."),
    )


def test_local_pool_is_media_mean_then_template_sum_by_hand():
    # template 7: media 1 (faces 0, 2), media 2 (face 3); template 3: media 5 (faces 1, 4).
    templates, medias = [7, 3, 7, 7, 3], [1, 5, 1, 2, 5]
    faceness = [0.9, 0.5, 0.7, 0.8, 0.6]
    rng = np.random.default_rng(0)
    points = rng.normal(size=(5, 4, 6)).astype(np.float32)
    for weighted in (False, True):
        pool = LocalPool(_meta(templates, medias, faceness), faceness=weighted)
        pool.add(np.array([3, 0]), points[[3, 0]])  # in any order, in several calls
        pool.add(np.array([1, 2, 4]), points[[1, 2, 4]])
        got = pool.result()
        w = np.asarray(faceness) if weighted else np.ones(5)
        t7 = (w[0] * points[0] + w[2] * points[2]) / 2 + w[3] * points[3]
        t3 = (w[1] * points[1] + w[4] * points[4]) / 2
        for row, expected in ((0, t3), (1, t7)):
            expected = expected / np.linalg.norm(expected, axis=-1, keepdims=True)
            np.testing.assert_allclose(got.local[row].astype(np.float32), expected, atol=2e-3)
        assert list(got.templates) == [3, 7] and got.local.dtype == np.float16


def test_mirror_points_lines_up_the_mirror_images_patches():
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    original = local_points(x, None).numpy()
    mirrored = local_points(x.flip(-1), None).numpy()
    assert not np.allclose(mirrored, original)
    np.testing.assert_array_equal(mirror_points(mirrored), original)
    # pooled to a coarser grid first: the same holds
    np.testing.assert_allclose(
        mirror_points(local_points(x.flip(-1), 2).numpy()), local_points(x, 2).numpy()
    )
    tokens = np.zeros((1, 5, 3))  # not a square grid (a ViT with a class token): unchanged
    assert mirror_points(tokens) is tokens


def test_alpha_zero_reproduces_stage_one_exactly_in_both_protocols():
    rng = np.random.default_rng(1)
    templates = np.arange(1, 13)
    feats = rng.normal(size=(12, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    pooled = TemplateFeatures(templates, feats)
    local = TemplateLocal(templates, rng.normal(size=(12, 4, 8)).astype(np.float16))
    pairs = np.array([[a, b] for a in range(1, 13) for b in range(a + 1, 13)])
    meta = _meta(list(templates), list(templates), [1.0] * 12)._replace(
        pair_templates=pairs, pair_labels=(pairs[:, 0] % 3 == pairs[:, 1] % 3).astype(np.int64)
    )
    stage1 = verify_templates(meta, pooled, "t")
    for alpha, same in ((0.0, True), (0.5, False)):
        stage2, _ = rerank_verification(meta, pooled, local, stage1, RerankOptions(alpha=alpha))
        assert np.array_equal(stage2.scores, stage1.scores) == same
        if same:
            np.testing.assert_array_equal(stage2.tars, stage1.tars)
    sim = feats[:6] @ feats[6:].T
    ident = identification_result(
        sim,
        np.array([0, 1, 2, -1, 4, 5]),
        "t",
        probe_templates=templates[:6],
        gallery_templates=templates[6:],
    )
    zero, _ = rerank_identification(ident, local, RerankOptions(alpha=0.0, k=3))
    np.testing.assert_array_equal(zero.similarity, ident.similarity)
    np.testing.assert_array_equal(zero.cmc, ident.cmc)
    np.testing.assert_array_equal(zero.tpirs, ident.tpirs)
    moved, _ = rerank_identification(ident, local, RerankOptions(alpha=0.5, k=3))
    assert not np.array_equal(moved.similarity, ident.similarity)
