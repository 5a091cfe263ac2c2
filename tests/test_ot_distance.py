"""OT distances (otface.ot.distance): gradients by finite differences, POT references, properties.

Finite differences are taken of the returned value, re-solved at each perturbed input, w.r.t. the
features the cosine cost is built from; autograd's gradient is the envelope one (plans held
constant). Float64, tight tolerance, small problems.
"""

import importlib

import numpy as np
import ot
import pytest
import torch

from otface.ot import DISTANCES, cosine_cost, entropic_objective, ot_distances, sinkhorn

EPS = 0.1
TIGHT = dict(eps=EPS, max_iter=20000, tol=1e-13)


def _bank(count=3, n=6, dims=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, n, dims, generator=g, dtype=torch.float64)


def _fd_relative_error(distance, points, source, target, weights, *, step=1e-6, solver="torch"):
    """||grad_fd - grad_autograd|| / ||grad_fd|| of ``weights @ value`` w.r.t. ``points``."""

    def f(p):
        return ot_distances(p, source, target, distance=distance, solver=solver, **TIGHT).value

    p = points.clone().requires_grad_(True)
    (f(p) @ weights).backward()
    fd = torch.zeros_like(points).view(-1)
    flat = points.reshape(-1)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = step
        hi, lo = f((flat + e).view_as(points)), f((flat - e).view_as(points))
        fd[i] = ((hi - lo) @ weights) / (2 * step)
    fd = fd.view_as(points)
    return ((fd - p.grad).norm() / fd.norm()).item()


# Two pairs sharing the cloud 0 (as in a triplet: (a, p), (a, n)), a signed combination (as in
# the hinge) so that every self-term enters the value.
_SOURCE, _TARGET = torch.tensor([0, 0]), torch.tensor([1, 2])
_WEIGHTS = torch.tensor([1.0, -0.7], dtype=torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("distance", ["divergence", "entropic"])
def test_gradient_matches_finite_differences(distance):
    # Measured on this problem: 1.0e-9 (divergence), 7.7e-10 (entropic).
    err = _fd_relative_error(distance, _bank(n=5, dims=4), _SOURCE, _TARGET, _WEIGHTS)
    assert err <= 1e-4


def test_transport_gradient_is_only_approximate():
    # The documented gap: <T*, C>'s gradient is taken as T*, the gradient of OT_eps (measured
    # 0.40 relative on this problem).
    err = _fd_relative_error("transport", _bank(n=5, dims=4), _SOURCE, _TARGET, _WEIGHTS)
    assert err > 1e-3


def test_entropic_gradient_with_pot_solver_matches_finite_differences():
    err = _fd_relative_error(
        "entropic", _bank(n=5, dims=4), _SOURCE[:1], _TARGET[:1], _WEIGHTS[:1], solver="pot"
    )
    assert err <= 1e-4


def test_entropic_value_matches_pot():
    bank = _bank(count=4, n=7, dims=8, seed=5)
    src, tgt = torch.tensor([0, 1, 2]), torch.tensor([3, 3, 0])
    got = ot_distances(bank, src, tgt, distance="entropic", **TIGHT).value
    a = np.full(7, 1 / 7)
    for k in range(3):
        c = cosine_cost(bank[src[k]][None], bank[tgt[k]][None])[0].numpy()
        ref = ot.solve(c, a, a, reg=EPS, reg_type="KL", max_iter=100000, tol=1e-13).value
        assert got[k].item() == pytest.approx(float(ref), abs=1e-10)
    # And POT's batched solver, for the same value through solver="pot".
    via_pot = ot_distances(bank, src, tgt, distance="entropic", solver="pot", **TIGHT).value
    torch.testing.assert_close(via_pot, got, atol=1e-10, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("distance", DISTANCES)
def test_pot_solver_gives_the_same_distances(distance):
    bank = _bank(count=4, n=6, dims=5, seed=6)
    src, tgt = torch.tensor([0, 1, 3]), torch.tensor([2, 2, 1])
    ours = ot_distances(bank, src, tgt, distance=distance, **TIGHT)
    pot = ot_distances(bank, src, tgt, distance=distance, solver="pot", **TIGHT)
    torch.testing.assert_close(pot.value, ours.value, atol=1e-9, rtol=0)


@pytest.mark.slow
def test_divergence_vanishes_on_identical_inputs_and_is_symmetric():
    bank = _bank(count=3, n=6, dims=5, seed=7)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    bank = torch.cat([bank, bank[:1, perm]])  # cloud 3: cloud 0 with its points reordered
    src, tgt = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 3, 2, 1])
    d = ot_distances(bank, src, tgt, distance="divergence", **TIGHT).value
    assert abs(d[0].item()) <= 1e-8 and abs(d[1].item()) <= 1e-8
    assert d[2].item() > 1e-3  # different clouds: clearly positive
    assert d[2].item() == pytest.approx(d[3].item(), abs=1e-12)
    # Not so for the biased value: OT_eps(alpha, alpha) > 0.
    e = ot_distances(bank, src, tgt, distance="entropic", **TIGHT).value
    assert e[0].item() > 1e-3


def test_self_terms_solved_once_in_the_same_batched_solve(monkeypatch):
    dist = importlib.import_module("otface.ot.distance")
    calls = []
    real = dist.solve_ot

    def spy(cost, **kw):
        calls.append((tuple(cost.shape), kw["symmetric"]))
        return real(cost, **kw)

    monkeypatch.setattr(dist, "solve_ot", spy)
    bank = _bank(count=5, n=4, dims=3, seed=8)
    # Cloud 1 is a target in one pair and a source in another; cloud 4 is unused. eps = 0.3:
    # plain alternating updates (the reference below) then converge on the self-problems too.
    src, tgt = torch.tensor([0, 1, 0]), torch.tensor([1, 2, 3])
    kw = dict(TIGHT, eps=0.3)
    out = ot_distances(bank, src, tgt, distance="divergence", **kw)
    assert len(calls) == 1
    (shape, symmetric) = calls[0]
    assert shape == (3 + 4, 4, 4) and out.n_problems == 7
    assert symmetric.tolist() == [False] * 3 + [True] * 4
    # Each value equals the divergence assembled from separate single solves (plain updates,
    # value from the plan alone).
    for k in range(3):
        x, y = bank[src[k]][None], bank[tgt[k]][None]
        ot_eps = []
        for c in (cosine_cost(x, y), cosine_cost(x, x), cosine_cost(y, y)):
            res = sinkhorn(c, **kw)
            ot_eps.append(entropic_objective(res.plan, c, eps=0.3).item())
        ref = ot_eps[0] - 0.5 * ot_eps[1] - 0.5 * ot_eps[2]
        assert out.value[k].item() == pytest.approx(ref, abs=1e-10)


def test_empty_pairs_stay_connected():
    bank = _bank().requires_grad_(True)
    none = torch.zeros(0, dtype=torch.long)
    for distance in DISTANCES:
        for solver in ("torch", "pot"):
            out = ot_distances(bank, none, none, distance=distance, solver=solver, **TIGHT)
            assert out.value.shape == (0,) and out.value.requires_grad
            (grad,) = torch.autograd.grad(out.value.sum(), bank)
            assert torch.count_nonzero(grad) == 0


def test_bad_arguments_are_named():
    bank = _bank()
    i = torch.tensor([0])
    with pytest.raises(ValueError, match="'wasserstein'.*divergence, entropic, transport"):
        ot_distances(bank, i, i, distance="wasserstein", **TIGHT)
    with pytest.raises(ValueError, match="equal length"):
        ot_distances(bank, i, torch.tensor([0, 1]), **TIGHT)
    with pytest.raises(ValueError, match=r"\(N, n, C\)"):
        ot_distances(bank[0], i, i, **TIGHT)
