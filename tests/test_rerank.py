"""OT re-scoring at test time: s_OT against POT's entropic plan, its limits, the marginals,
stage 2 with α = 0 equal to stage 1, the top-k re-ranking, and the command line."""

from __future__ import annotations

import re

import numpy as np
import ot
import pytest
import torch
from _scripts import load_eval_script

from otface.backbones import get_model
from otface.evaluation.bin_io import PairSet, write_bin
from otface.evaluation.pairs_rerank import pair_scores, stage_results
from otface.evaluation.rerank import (
    LocalEmbedder,
    RerankOptions,
    ot_similarity,
    patch_weights,
    rerank_top_k,
)
from otface.evaluation.verification import TorchEmbedder, evaluate_pairs


def _points(b, n, c=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(
        torch.randn(b, n, c, generator=g, dtype=torch.float64), dim=-1
    )


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("weights", ["uniform", "cross"])
def test_s_ot_equals_pots_entropic_plan_on_the_same_cost_and_marginals(weights):
    u, v = _points(3, 9, seed=1), _points(3, 7, seed=2)
    v[:, :, :4] += 0.8  # cross weights that differ from uniform (some zero)
    res = ot_similarity(u, v, weights=weights, eps=0.1, max_iter=5000, tol=1e-10)
    for k in range(3):
        cos = (u[k] @ torch.nn.functional.normalize(v[k], dim=-1).T).numpy()
        plan = ot.sinkhorn(
            res.a[k].numpy(),
            res.b[k].numpy(),
            1.0 - cos,
            0.1,
            numItermax=100000,
            stopThr=1e-12,
            method="sinkhorn_log",
        )
        assert abs(res.score[k].item() - float((plan * cos).sum())) < 1e-5
        np.testing.assert_allclose(res.plan[k].numpy(), plan, atol=1e-6)


def test_a_face_against_itself():
    u = _points(1, 12, seed=3)
    others = _points(5, 12, seed=4)
    previous = -1.0
    for eps in (0.2, 0.05, 0.01, 0.002):
        res = ot_similarity(u, u, eps=eps, max_iter=20000, tol=1e-9)
        plan = res.plan[0]
        # Diagonal-dominant: each row puts its largest mass on its own point.
        assert torch.equal(plan.argmax(dim=1), torch.arange(12))
        score = res.score.item()
        assert score >= previous - 1e-9 and score <= 1.0 + 1e-9
        previous = score
        against = ot_similarity(u.expand(5, -1, -1), others, eps=eps, max_iter=20000, tol=1e-9)
        assert (against.score < score).all()
    assert previous > 0.999  # tends to 1 as eps shrinks


def test_cross_marginals_are_non_negative_and_sum_to_one():
    u, v = _points(4, 9, seed=5), _points(4, 6, seed=6)
    a, b = patch_weights(u, v, "cross")
    assert (a >= 0).all() and (b >= 0).all()
    torch.testing.assert_close(a.sum(1), torch.ones(4, dtype=a.dtype))
    torch.testing.assert_close(b.sum(1), torch.ones(4, dtype=b.dtype))
    # A patch pointing away from the other face's mean gets no mass; a face all of whose
    # patches do falls back to uniform.
    away = -torch.nn.functional.normalize(v.mean(1, keepdim=True), dim=-1)
    a2, _ = patch_weights(torch.cat([u[:, :8], away], dim=1), v, "cross")
    assert (a2[:, 8] == 0).all()
    a3, _ = patch_weights(away.expand(-1, 3, -1), v, "cross")
    torch.testing.assert_close(a3, torch.full_like(a3, 1 / 3))
    with pytest.raises(ValueError, match="uniform, cross"):
        patch_weights(u, v, "softmax")


def test_rerank_top_k_rescores_the_top_and_keeps_the_rest_in_order():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 30))
    k = 5
    seen = []

    def rescore(rows, cols, stage1):
        seen.append((rows, cols))
        return stage1 - 10.0 * rng.random(len(rows))  # may fall far below the untouched

    out = rerank_top_k(scores, k, rescore)
    for p in range(6):
        top = set(np.argsort(-scores[p])[:k])
        assert set(seen[0][1][seen[0][0] == p]) == top
        rest = [g for g in np.argsort(-scores[p]) if g not in top]
        # Outside the top k: same order as stage 1, and all below every re-scored entry.
        assert list(np.argsort(-out[p][rest], kind="stable")) == list(range(len(rest)))
        assert out[p][rest].max() < min(out[p][g] for g in top)
    # k = G re-scores everything; the identity re-scoring changes nothing.
    same = rerank_top_k(scores, 30, lambda r, c, s: s)
    np.testing.assert_array_equal(same, scores)


def _faces(n, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n // 2, 3, 112, 112), dtype=np.uint8)
    noisy = np.clip(base.astype(int) + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    images = np.empty((n, 3, 112, 112), np.uint8)
    images[0::2], images[1::2] = base, noisy[rng.permutation(n // 2)]
    return images


def test_alpha_zero_reproduces_stage_one_exactly():
    torch.manual_seed(0)
    net = get_model("r18_lite", num_features=64).eval()
    images = _faces(40, seed=1)
    issame = np.array([i % 2 == 0 for i in range(20)])
    pairs = PairSet(images, issame)
    scores = pair_scores(LocalEmbedder(net, grid=4), pairs, RerankOptions(max_iter=20))
    stage1, stage2 = stage_results(scores, 0.0)
    assert stage2 == stage1
    assert stage1 == evaluate_pairs(TorchEmbedder(net), pairs)
    assert scores.s_ot.shape == (20,) and np.isfinite(scores.s_ot).all()


def test_cli_prints_both_stages_and_the_conditions(tmp_path, capsys):
    torch.manual_seed(0)
    net = get_model("r18_lite", num_features=512)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    images = _faces(40, seed=2).transpose(0, 2, 3, 1)
    write_bin(tmp_path / "hardish.bin", images, np.array([i % 2 == 0 for i in range(20)]))
    (tmp_path / "hardish.conditions.txt").write_text("mask\ncrop\n" * 10)
    argv = [
        "--model",
        str(tmp_path / "model.pt"),
        "--network",
        "r18_lite",
        "--data",
        str(tmp_path),
        "--targets",
        "hardish",
        "--device",
        "cpu",
        "--nfolds",
        "2",
    ]
    script = load_eval_script("verification")
    assert script.main(argv + ["--rerank", "ot", "--patch-grid", "3"]) == 0
    out = capsys.readouterr().out
    assert "[hardish]Accuracy-Flip:" in out and "[hardish][rerank]Accuracy-Flip:" in out
    assert re.search(r"\|\s+20 \|\s+all \|\s+[\d.]+ \|\s+[\d.]+ \|", out)
    assert re.search(r"\|\s+10 \|\s+mask \|", out) and re.search(r"\|\s+10 \|\s+crop \|", out)
    # Without --rerank: stage 1 and the condition rows only.
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "[rerank]" not in out and re.search(r"\|\s+10 \|\s+mask \|\s+[\d.]+ \|\n", out)
    with pytest.raises(SystemExit):
        script.main(argv + ["--rerank", "ot", "--rerank-alpha", "1.5"])
    assert "alpha must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_onnx_local_features_file_matches_pytorch_and_the_zoo_file_keeps_one_output(
    tmp_path, capsys
):
    import onnx

    from otface.evaluation.rerank import OnnxLocalEmbedder
    from otface.export import export_model

    torch.manual_seed(0)
    net = get_model("r18_lite", num_features=512).eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    result = export_model(
        tmp_path / "model.pt", network="r18_lite", package=False, local_features=True
    )
    assert len(onnx.load(str(result.onnx_path)).graph.output) == 1  # the model-zoo file
    local_file = tmp_path / "model_local.onnx"
    assert [o.name for o in onnx.load(str(local_file)).graph.output] == ["embedding", "local"]
    images = _faces(6, seed=3)
    emb_onnx, local_onnx = OnnxLocalEmbedder(local_file)(images)
    emb_pt, local_pt = LocalEmbedder(net)(images)
    np.testing.assert_allclose(emb_onnx, emb_pt, atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(local_onnx, local_pt, atol=2e-4)
    # The verification command re-scores with the ONNX model through that file.
    write_bin(tmp_path / "tiny.bin", _faces(8, seed=4).transpose(0, 2, 3, 1), [True, False] * 2)
    script = load_eval_script("verification")
    argv = ["--model", str(result.onnx_path), "--data", str(tmp_path), "--targets", "tiny",
            "--nfolds", "2", "--rerank", "ot"]  # fmt: skip
    assert script.main(argv) == 0
    assert "[tiny][rerank]Accuracy-Flip:" in capsys.readouterr().out
    local_file.unlink()
    assert script.main(argv) == 1
    assert "--local-features" in capsys.readouterr().err
    # Rows per condition need no local features: the ONNX model alone gives them.
    (tmp_path / "tiny.conditions.txt").write_text("mask\ncrop\n" * 2)
    assert script.main(argv[:-2]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\|\s+2 \|\s+mask \|\s+[\d.]+ \|\n", out) and "[rerank]" not in out
