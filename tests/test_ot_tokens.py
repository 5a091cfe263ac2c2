"""The OT term on a ViT's patch tokens: the hook, masked tokens as zero-mass points, mining.

References are independent of our solver: POT's log-domain Sinkhorn (``ot.sinkhorn``) on the
kept tokens only, with the entropic objective and the divergence written out by hand; and
finite differences in float64 for the gradients.
"""

import logging
import os

import numpy as np
import ot as pot
import pytest
import torch

import otface.hard_triplet_ot as ot_term_mod
from otface.backbones import VisionTransformer, get_model
from otface.hooks import FeatureCapture
from otface.loss import hard_triplet_ot_loss
from otface.ot import cosine_cost, ot_distances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = 144
EPS = 0.1


def _tiny_vit(mask_ratio=0.25):
    # 36 px images in 3 px patches: the 12 x 12 grid (144 tokens) of a 112 px vit_t, cheaply.
    torch.manual_seed(0)
    return VisionTransformer(
        num_features=8,
        img_size=36,
        patch_size=3,
        embed_dim=16,
        depth=1,
        num_heads=2,
        mask_ratio=mask_ratio,
    )


def _masks(counts, n=TOKENS, *, seed):
    """(B, n) bool masks, row k with counts[k] True at random positions."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c in counts:
        row = torch.zeros(n, dtype=torch.bool)
        row[torch.randperm(n, generator=g)[:c]] = True
        rows.append(row)
    return torch.stack(rows)


def _weights(mask, dtype=torch.float64):
    return mask.to(dtype) / mask.sum(1, keepdim=True).to(dtype)


def _pot_entropic(x, y, *, eps):
    """OT_eps(x, y) = <T, C> + eps KL(T | a b^T) of uniform clouds, T from POT (float64)."""
    x, y = x.double().numpy(), y.double().numpy()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    cost = 1.0 - xn @ yn.T
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    plan = pot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-12)
    kl = np.sum(plan * np.log(plan / np.outer(a, b))) - plan.sum() + 1.0
    return float(np.sum(plan * cost)), float(np.sum(plan * cost) + eps * kl)


# ------------------------------------------------------------------------------------- the hook


def test_auto_hook_captures_the_final_patch_tokens_and_their_mask():
    net = _tiny_vit().train()
    x = torch.randn(3, 3, 36, 36)
    with FeatureCapture(net) as cap:
        assert cap.layer == "patch_tokens"
        net(x)
        tokens = cap.pop()
        mask = cap.point_mask(tokens)
        assert tokens.shape == (3, TOKENS, 16) and tokens.requires_grad
        assert mask.shape == (3, TOKENS) and mask.dtype == torch.bool
        assert mask.sum(1).tolist() == [int(TOKENS * 0.75)] * 3
        # Masked positions hold the learned mask token, the kept ones the final-norm tokens.
        filler = net.mask_token.detach().expand(3, TOKENS, 16)
        assert torch.equal(tokens.detach()[~mask], filler[~mask])
        assert not torch.isclose(tokens.detach()[mask], filler[mask]).all(-1).any()
        # Eval mode masks nothing: no mask, every token is a point.
        net.eval()
        net(x)
        assert cap.point_mask(cap.pop()) is None
    # A hooked block sees only the kept tokens: the (B, 144) mask does not describe them.
    net.train()
    with FeatureCapture(net, layer="blocks.0") as cap:
        net(x)
        block_out = cap.pop()
        assert block_out.shape == (3, 108, 16) and cap.point_mask(block_out) is None


# ------------------------------------------------------------- masked tokens: zero-mass points


@pytest.mark.parametrize(
    "solver,kernel", [("torch", "torch"), ("torch", "matmul"), ("pot", "auto")]
)
def test_masked_distances_equal_pot_on_the_kept_tokens_alone(solver, kernel):
    torch.manual_seed(1)
    # Ragged: every sample keeps a different number of its 144 tokens.
    mask = _masks([130, 100, 144, 73], seed=2)
    points = torch.randn(4, TOKENS, 8, dtype=torch.float64)
    source, target = torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 3, 2])
    kw = dict(eps=EPS, max_iter=5000, tol=1e-9, solver=solver, kernel=kernel, warn=False)
    ours = {
        d: ot_distances(points, source, target, weights=_weights(mask), distance=d, **kw).value
        for d in ("transport", "entropic", "divergence")
    }
    kept = [points[k][mask[k]] for k in range(4)]
    self_ot = [_pot_entropic(c, c, eps=EPS)[1] for c in kept]
    for k, (s, t) in enumerate(zip(source.tolist(), target.tolist())):
        transport, entropic = _pot_entropic(kept[s], kept[t], eps=EPS)
        divergence = entropic - 0.5 * self_ot[s] - 0.5 * self_ot[t]
        assert ours["transport"][k].item() == pytest.approx(transport, abs=1e-7)
        assert ours["entropic"][k].item() == pytest.approx(entropic, abs=1e-7)
        assert ours["divergence"][k].item() == pytest.approx(divergence, abs=1e-7)


def test_masked_distance_is_close_to_exact_emd_of_the_kept_tokens_at_small_eps():
    # A second, unregularised reference: POT's exact EMD between the kept tokens.
    torch.manual_seed(3)
    mask = _masks([120, 90], seed=4)
    points = torch.randn(2, TOKENS, 4, dtype=torch.float64)
    res = ot_distances(
        points,
        torch.tensor([0]),
        torch.tensor([1]),
        weights=_weights(mask),
        distance="transport",
        eps=0.005,
        max_iter=5000,
        tol=1e-6,
        warn=False,
    )
    x, y = (points[k][mask[k]] for k in range(2))
    cost = cosine_cost(x[None], y[None])[0].numpy()
    emd = pot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), cost)
    # The entropic plan's cost is above the exact one by O(eps log n): 3e-4 here, where all 144
    # tokens of each (the masked ones as points) would give 0.078 against 0.099.
    assert emd <= res.value.item() <= emd + 1e-3


@pytest.mark.parametrize("relaxation,eps_scaling", [(1.0, 0.0), (1.6, 0.0), (1.6, 0.5)])
def test_zero_mass_points_give_finite_values_and_no_gradient(relaxation, eps_scaling):
    torch.manual_seed(5)
    mask = _masks([129, 129, 100], seed=6)
    points = torch.randn(3, TOKENS, 6, dtype=torch.float64, requires_grad=True)
    source, target = torch.tensor([0, 0, 2]), torch.tensor([1, 2, 1])
    kw = dict(
        eps=0.05,
        max_iter=3000,
        tol=1e-10,
        relaxation=relaxation,
        eps_scaling=eps_scaling,
        warn=False,
    )

    def value(p):
        return ot_distances(p, source, target, weights=_weights(mask), **kw).value

    w = value(points)
    assert torch.isfinite(w).all()
    w.sum().backward()
    grad = points.grad
    assert torch.isfinite(grad).all()
    assert grad[~mask].abs().max().item() == 0.0  # masked tokens: exactly no gradient
    assert grad[mask].abs().max().item() > 0
    # The masked tokens' values never enter: other fillers give the same distances.
    other = points.detach().clone()
    other[~mask] = 100 * torch.randn(int((~mask).sum()), 6, dtype=torch.float64)
    assert torch.allclose(value(other), w.detach(), atol=1e-12, rtol=0)
    # Envelope gradient = finite differences on the kept tokens (float64, converged solves).
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        direction = torch.randn(points.shape, generator=g, dtype=torch.float64) * mask[..., None]
        h = 1e-5
        with torch.no_grad():
            fd = (value(points + h * direction) - value(points - h * direction)).sum() / (2 * h)
        assert (grad * direction).sum().item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-9)


def test_masked_distance_equals_the_distance_of_the_compacted_tokens():
    # Our own solve on only the kept tokens, uniform: the same value and kept-token gradients.
    torch.manual_seed(8)
    mask = _masks([129, 129, 129], seed=9)
    points = torch.randn(3, TOKENS, 6, requires_grad=True)
    kw = dict(eps=0.05, max_iter=2000, tol=1e-6, warn=False)
    source, target = torch.tensor([0, 1]), torch.tensor([1, 2])
    full = ot_distances(points, source, target, weights=_weights(mask, torch.float32), **kw).value
    full.sum().backward()
    compact = points.detach()[mask].view(3, 129, 6).requires_grad_()
    ref = ot_distances(compact, source, target, **kw).value
    ref.sum().backward()
    assert torch.allclose(full, ref, atol=2e-6)
    assert torch.allclose(points.grad[mask].view(3, 129, 6), compact.grad, atol=1e-6)


def test_weights_of_the_wrong_shape_are_refused():
    points = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"weights must be \(N, n\) = \(2, 5\)"):
        ot_distances(
            points, torch.tensor([0]), torch.tensor([1]), weights=torch.ones(2, 4) / 4, eps=0.1,
            max_iter=10, tol=1e-3,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"point_mask must be \(B, n\) = \(4, 5\)"):
        hard_triplet_ot_loss(
            torch.randn(4, 5, 3),
            torch.randn(4, 8),
            torch.tensor([0, 0, 1, 1]),
            point_mask=torch.ones(4, 6, dtype=torch.bool),
        )


# ---------------------------------------------------------------- the OT loss on token features

LOSS_KW = dict(eps=0.05, max_iter=500, tol=1e-5, relaxation=1.6)


def _batch(seed, *, n_ids=4, k=3, dim=8, side=12):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_ids).repeat_interleave(k)
    emb = torch.randn(n_ids * k, 16, generator=g)
    fmap = torch.randn(n_ids * k, dim, side, side, generator=g)
    return fmap, emb, labels


def _recording_miners(monkeypatch):
    seen = []
    for name in ("mine_hard_triplets", "mine_hard_triplet_slots"):
        original = getattr(ot_term_mod, name)

        def wrapped(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            seen.append(tuple(t.clone() for t in out))
            return out

        monkeypatch.setattr(ot_term_mod, name, wrapped)
    return seen


@pytest.mark.parametrize("mode", ["spatial", "group"])
@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_tokens_mine_and_lose_as_the_same_features_fed_as_a_map(monkeypatch, mode, fixed_shapes):
    fmap, emb, labels = _batch(10)
    fmap[5, 0, 3, 3] = float("nan")  # a non-finite sample is left out in both layouts
    tokens = fmap.flatten(2).transpose(1, 2).contiguous()  # (B, 144, C), grid order
    seen = _recording_miners(monkeypatch)
    results = []
    for feats in (fmap.clone().requires_grad_(), tokens.clone().requires_grad_()):
        out = hard_triplet_ot_loss(
            feats, emb, labels, mode=mode, fixed_shapes=fixed_shapes, **LOSS_KW
        )
        out.loss.backward()
        results.append((out, feats.grad))
    (map_out, map_grad), (tok_out, tok_grad) = results
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(*seen))
    assert map_out.metrics["n_hard"].item() == tok_out.metrics["n_hard"].item() > 0
    assert map_out.metrics["ot_nonfinite"].item() == tok_out.metrics["ot_nonfinite"].item() == 1
    assert torch.allclose(map_out.loss, tok_out.loss, atol=1e-6)
    for key in ("w_ap", "w_an"):
        assert torch.allclose(map_out.metrics[key], tok_out.metrics[key], atol=1e-6)
    assert torch.allclose(map_grad.flatten(2).transpose(1, 2), tok_grad, atol=1e-6)


@pytest.mark.parametrize("mode", ["spatial", "group"])
@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_masked_tokens_lose_as_the_kept_tokens_alone(mode, fixed_shapes):
    # A ViT masks the same number of tokens in every image: the kept ones compact to
    # (B, 129, C) tokens, which must give the loss that the masked (B, 144, C) tokens give.
    fmap, emb, labels = _batch(11)
    tokens = fmap.flatten(2).transpose(1, 2).contiguous()
    mask = _masks([129] * len(labels), seed=12)
    full = tokens.clone().requires_grad_()
    compact = tokens[mask].view(len(labels), 129, -1).clone().requires_grad_()
    kw = dict(mode=mode, fixed_shapes=fixed_shapes, **LOSS_KW)
    masked = hard_triplet_ot_loss(full, emb, labels, point_mask=mask, **kw)
    ref = hard_triplet_ot_loss(compact, emb, labels, **kw)
    masked.loss.backward()
    ref.loss.backward()
    assert masked.metrics["n_hard"].item() == ref.metrics["n_hard"].item() > 0
    assert torch.allclose(masked.loss, ref.loss, atol=1e-5)
    assert torch.allclose(full.grad[mask].view_as(compact), compact.grad, atol=1e-6)
    assert full.grad[~mask].abs().max().item() == 0.0


def test_a_sample_without_kept_tokens_is_left_out():
    fmap, emb, labels = _batch(13)
    tokens = fmap.flatten(2).transpose(1, 2).contiguous().requires_grad_()
    mask = _masks([129] * len(labels), seed=14)
    mask[4] = False
    out = hard_triplet_ot_loss(tokens, emb, labels, point_mask=mask, fixed_shapes=True, **LOSS_KW)
    out.loss.backward()
    assert out.metrics["ot_nonfinite"].item() == 1
    assert torch.isfinite(out.loss) and torch.isfinite(tokens.grad).all()
    assert tokens.grad[4].abs().max().item() == 0.0


def test_criterion_gives_the_mask_token_no_ot_gradient():
    from otface.config import load_config
    from otface.registry import LOSSES

    cfg = load_config(os.path.join(ROOT, "configs", "demo_vit_otface"))
    cfg.update(num_classes=4, embedding_size=8)
    cfg.otface.update(warmup_steps=0, tol=1e-4)
    net = _tiny_vit().train()
    crit = LOSSES.build("otface", cfg, backbone=net, rank=0, world_size=1)
    labels = torch.arange(4).repeat_interleave(3)
    out = crit(net(torch.randn(12, 3, 36, 36)), labels, step=1)
    assert out.metrics["n_hard"].item() > 0 and out.terms["ot"].item() > 0
    # The OT term alone: the mask token (and so every masked position) gets nothing from it.
    grads = torch.autograd.grad(out.terms["ot"], [net.mask_token, net.pos_embed])
    assert grads[0].abs().max().item() == 0.0 and grads[1].abs().max().item() > 0
    crit.remove_hook()


# -------------------------------------------------------------------- the demo ViT configuration


@pytest.mark.slow
def test_demo_vit_config_trains_with_hard_triplets(tmp_path, tiny_demo, caplog):
    from otface.config import load_config
    from otface.train.distributed import DistEnv
    from otface.train.loop import fit

    cfg = load_config(os.path.join(ROOT, "configs", "demo_vit_otface"))
    assert get_model(cfg.network).feature_layer == "patch_tokens"
    # The tiny demo set (8 identities of 4 images): 3 steps of P x K = 8 x 4.
    cfg.update(
        rec=str(tiny_demo),
        num_classes=8,
        num_image=32,
        batch_size=32,
        num_epoch=3,
        warmup_epoch=0,
        frequent=1,
        verbose=10**6,
        val_targets=[],
        num_workers=0,
        output=str(tmp_path / "run"),
        save_all_states=False,
    )
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with caplog.at_level(logging.INFO):
        fit(cfg, env)
    lines = [r.getMessage() for r in caplog.records if "Global Step" in r.getMessage()]
    assert len(lines) == 3, caplog.text
    for line in lines:
        n_hard = float(line.split("n_hard ")[1].split()[0])
        assert n_hard > 0, line
