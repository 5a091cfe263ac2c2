"""Sinkhorn solver, cosine cost and solver front, checked against POT and finite differences."""

import importlib

import numpy as np
import ot
import pytest
import torch

from otface.ot import cosine_cost, entropic_objective, sinkhorn, solve_ot
from otface.ot.marginals import error_rounding_bound, problem_marginal_errors
from otface.ot.pot_backend import pot_sinkhorn


def _costs(batch, n, m, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 16, generator=g, dtype=dtype)
    y = torch.randn(batch, m, 16, generator=g, dtype=dtype) + 0.5 * x.mean(1, keepdim=True)
    return cosine_cost(x, y)


def _assert_pot_plans(res, c, eps):
    """Each plan of ``res`` against POT's log-domain Sinkhorn on the same cost, run to 1e-14."""
    for i in range(c.shape[0]):
        n, m = c.shape[1:]
        a, b = np.full(n, 1 / n), np.full(m, 1 / m)
        ref = ot.sinkhorn(
            a, b, c[i].numpy(), eps, method="sinkhorn_log", numItermax=100000, stopThr=1e-14
        )
        np.testing.assert_allclose(res.plan[i].numpy(), ref, atol=1e-5)


def test_cosine_cost_matches_numpy():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    c = cosine_cost(x, y)
    xn = x.numpy() / np.linalg.norm(x.numpy(), axis=-1, keepdims=True)
    yn = y.numpy() / np.linalg.norm(y.numpy(), axis=-1, keepdims=True)
    ref = 1.0 - np.einsum("bic,bjc->bij", xn, yn)
    np.testing.assert_allclose(c.numpy(), ref, atol=1e-6)
    assert c.min() >= 0 and c.max() <= 2


@pytest.mark.parametrize("kernel", ["torch", "matmul"])
def test_batched_equals_loop_of_single_solves(kernel):
    c = _costs(6, 7, 9)
    batched = sinkhorn(c, eps=0.1, max_iter=200, tol=1e-9, kernel=kernel, check_every=1)
    for i in range(c.shape[0]):
        single = sinkhorn(c[i : i + 1], eps=0.1, max_iter=200, tol=1e-9, kernel=kernel)
        torch.testing.assert_close(batched.plan[i], single.plan[0], atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(batched.cost[i], single.cost[0])


def test_kernels_agree():
    c = _costs(5, 10, 12, dtype=torch.float32)
    ref = sinkhorn(c, eps=0.05, max_iter=50, tol=0.0, kernel="torch")
    fast = sinkhorn(c, eps=0.05, max_iter=50, tol=0.0, kernel="matmul")
    torch.testing.assert_close(fast.plan, ref.plan, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:sinkhorn did not reach")
def test_small_eps_approaches_exact_emd():
    # -C/eps spans ~1000 here: only the log domain survives (auto picks the reference kernel).
    c = _costs(4, 10, 12, seed=3)
    res = sinkhorn(c, eps=1e-3, max_iter=3000, tol=1e-4, check_every=20)
    assert res.marginal_error.item() < 1e-3
    assert torch.isfinite(res.plan).all()
    for i in range(c.shape[0]):
        a, b = np.full(10, 1 / 10), np.full(12, 1 / 12)
        exact = ot.emd2(a, b, c[i].numpy())
        assert abs(res.cost[i].item() - exact) / exact < 1e-2


def test_plan_matches_pot_sinkhorn_log():
    c = _costs(3, 8, 11, seed=4)
    eps = 0.05
    res = sinkhorn(c, eps=eps, max_iter=5000, tol=1e-12, check_every=1)
    _assert_pot_plans(res, c, eps)


def _assert_errors_are_the_plans(res, c, a, b, *, eps):
    """The reported errors are the plans' own, to the rounding bound the solver states."""
    gap = (res.problem_errors - problem_marginal_errors(res.plan, a, b)).abs()
    assert (gap <= error_rounding_bound(c, res.potentials, eps=eps)).all()


@pytest.mark.parametrize("relaxation", [1.0, 1.6])
def test_marginals_hold_to_tol_with_given_weights(relaxation):
    # Both marginals: an over-relaxed v update leaves the columns off (a stop test on the rows
    # alone returned column errors of 1.2e-6 here at omega 1.6).
    c = _costs(4, 6, 5, seed=5)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 6, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(4, 5, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    tol = 1e-6
    res = sinkhorn(c, a=a, b=b, eps=0.05, max_iter=1000, tol=tol, relaxation=relaxation)
    assert res.n_iter < 1000
    assert (res.problem_errors < tol).all()  # what the stop test compared with tol
    assert res.marginal_error == res.problem_errors.max()
    _assert_errors_are_the_plans(res, c, a, b, eps=0.05)


def test_early_stop_and_fixed_iterations():
    c = _costs(2, 6, 6, seed=6)
    assert sinkhorn(c, eps=0.1, max_iter=37, tol=0.0).n_iter == 37
    assert sinkhorn(c, eps=0.5, max_iter=1000, tol=1e-3, check_every=5).n_iter % 5 == 0


def test_envelope_gradient_of_entropic_objective_gradcheck():
    eps = 0.2
    c0 = _costs(2, 4, 5, seed=7).clone().requires_grad_(True)

    def objective(cost):
        res = sinkhorn(cost, eps=eps, max_iter=10000, tol=1e-13, check_every=1)
        return entropic_objective(res.plan, cost, eps=eps)

    assert torch.autograd.gradcheck(objective, (c0,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_transport_cost_gradient_is_the_plan():
    c = _costs(3, 5, 6, seed=8).requires_grad_(True)
    res = sinkhorn(c, eps=0.1, max_iter=300, tol=1e-9)
    assert res.plan.grad_fn is None and not res.plan.requires_grad
    res.cost.sum().backward()
    torch.testing.assert_close(c.grad, res.plan)


def test_fp32_under_autocast():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    y = torch.randn(3, 7, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = (x * 1.0).to(torch.bfloat16)
        cost = cosine_cost(xb, y.to(torch.bfloat16))
        cost_bf16 = cost.to(torch.bfloat16)
        res = sinkhorn(cost_bf16, eps=0.05, max_iter=50, tol=1e-4)
    assert cost.dtype == torch.float32
    assert res.plan.dtype == torch.float32 and res.cost.dtype == torch.float32
    # The same numbers solved in float32 outside autocast give the same plan.
    ref = sinkhorn(cost_bf16.detach().float(), eps=0.05, max_iter=50, tol=1e-4)
    torch.testing.assert_close(res.plan, ref.plan, atol=1e-7, rtol=1e-5)
    res.cost.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_solve_ot_pot_agrees_and_bad_solver_is_named():
    c = _costs(4, 9, 9, seed=10, dtype=torch.float32)
    ours = solve_ot(c, eps=0.05, max_iter=500, tol=1e-7, solver="torch")
    pot = solve_ot(c, eps=0.05, max_iter=500, tol=1e-7, solver="pot")
    torch.testing.assert_close(pot.plan, ours.plan, atol=1e-5, rtol=1e-3)
    assert solve_ot(c, eps=0.05, max_iter=50, tol=1e-3).plan.shape == (4, 9, 9)
    with pytest.raises(ValueError, match="'cuda'.*auto, torch, pot"):
        solve_ot(c, eps=0.05, max_iter=50, tol=1e-3, solver="cuda")
    with pytest.raises(ValueError, match="kernel 'fast'"):
        sinkhorn(c, eps=0.05, max_iter=5, tol=0.0, kernel="fast")


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, n, m\)"):
        sinkhorn(torch.zeros(4, 4), eps=0.05, max_iter=10, tol=1e-3)
    with pytest.raises(ValueError, match="eps"):
        sinkhorn(torch.zeros(1, 4, 4), eps=0.0, max_iter=10, tol=1e-3)


@pytest.mark.parametrize("solver", ["torch", "pot"])
def test_empty_batch_is_empty_and_connected(solver):
    cost = torch.rand(0, 4, 5, dtype=torch.float64, requires_grad=True)
    res = solve_ot(cost, eps=0.05, max_iter=10, tol=1e-3, solver=solver)
    assert res.plan.shape == (0, 4, 5) and res.cost.shape == (0,) and res.n_iter == 0
    assert res.marginal_error.item() == 0.0
    assert res.cost.requires_grad
    (grad,) = torch.autograd.grad(res.cost.sum(), cost)
    assert grad.shape == (0, 4, 5)


@pytest.mark.parametrize("shape", [(2, 0, 5), (2, 5, 0), (0, 0, 3)])
def test_distribution_without_points_is_a_value_error(shape):
    # Uniform weights 1/n do not exist for n = 0 (it was a ZeroDivisionError).
    with pytest.raises(ValueError, match="no points"):
        sinkhorn(torch.zeros(shape), eps=0.05, max_iter=10, tol=1e-3)
    with pytest.raises(ValueError, match="no points"):
        pot_sinkhorn(torch.zeros(shape), eps=0.05, max_iter=10, tol=1e-3)


@pytest.mark.parametrize("kernel", ["torch", "matmul"])
def test_infinite_cost_entry_carries_no_mass_and_no_nan(kernel):
    finite = _costs(2, 5, 6, seed=12)
    finite[0, 1, 2] = 1e4  # exp(-1e4 / eps) is exactly 0: the same problem as +inf
    inf = finite.clone()
    inf[0, 1, 2] = float("inf")
    kw = dict(eps=0.1, max_iter=500, tol=1e-10, kernel=kernel)
    ref = sinkhorn(finite, **kw)
    inf.requires_grad_(True)
    res = sinkhorn(inf, **kw)
    assert res.plan[0, 1, 2].item() == 0.0
    torch.testing.assert_close(res.plan, ref.plan, atol=0, rtol=0)
    assert torch.isfinite(res.cost).all()  # not 0 * inf = NaN
    torch.testing.assert_close(res.cost.detach(), ref.cost, atol=0, rtol=0)
    value = entropic_objective(res.plan, inf, eps=0.1, potentials=res.potentials)
    assert torch.isfinite(value).all()
    (res.cost.sum() + value.sum()).backward()
    torch.testing.assert_close(inf.grad, 2 * res.plan)


@pytest.mark.parametrize("kernel", ["torch", "matmul"])
def test_nan_problem_does_not_stop_the_others_from_stopping(kernel):
    c = _costs(4, 6, 7, seed=13)
    bad = c.clone()
    bad[2, 3, 4] = float("nan")
    kw = dict(eps=0.1, max_iter=2000, tol=1e-8, check_every=1, kernel=kernel)
    ok = [0, 1, 3]
    ref = sinkhorn(c[ok], **kw)
    res = sinkhorn(bad, **kw)
    assert ref.n_iter < 2000
    assert res.n_iter == ref.n_iter  # was max_iter: a NaN error never fell below tol
    assert torch.isnan(res.plan[2]).all() and torch.isnan(res.cost[2])
    torch.testing.assert_close(res.plan[ok], ref.plan)
    assert torch.isfinite(res.marginal_error)
    assert res.marginal_error.item() == pytest.approx(ref.marginal_error.item(), rel=1e-6)


def test_symmetric_problems_converge_fast_to_the_same_fixed_point():
    # Self-problems OT(alpha, alpha) with a near-diagonal kernel: alternating updates
    # oscillate (2e-7 marginal error after 20000 iterations here); averaged ones converge.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    c = torch.cat([cosine_cost(x, x), cosine_cost(x[:1], x[1:2])])
    mask = torch.tensor([True, True, True, False])
    res = sinkhorn(c, eps=0.1, max_iter=200, tol=1e-12, check_every=1, symmetric=mask)
    assert res.n_iter < 100
    assert (res.problem_errors < 1e-12).all()
    a = torch.full((4, 6), 1 / 6, dtype=torch.float64)
    _assert_errors_are_the_plans(res, c, a, a, eps=0.1)
    # A diagonal scaling of exp(-C/eps) with these marginals is unique (Sinkhorn's theorem).
    u, v = res.potentials
    scaled = torch.exp(u[..., None] + v[..., None, :] - c / 0.1)
    torch.testing.assert_close(res.plan, scaled, atol=1e-15, rtol=1e-12)
    plain = sinkhorn(c, eps=0.1, max_iter=5000, tol=0.0)
    assert plain.marginal_error.item() > 1e-8
    torch.testing.assert_close(res.plan, plain.plan, atol=1e-6, rtol=0)
    # The cross problem is solved exactly as without the mask.
    alone = sinkhorn(c[3:], eps=0.1, max_iter=200, tol=1e-12, check_every=1)
    torch.testing.assert_close(res.plan[3], alone.plan[0], atol=1e-13, rtol=0)
    with pytest.raises(ValueError, match="symmetric"):
        sinkhorn(_costs(2, 4, 5), eps=0.1, max_iter=5, tol=0.0, symmetric=mask[:2])


def test_entropic_value_convention_and_dual_accuracy():
    # OT_eps = <T, C> + eps * KL(T | a b^T), checked by hand from POT's plan.
    c = _costs(3, 10, 12, seed=14)
    eps = 0.05
    ref = sinkhorn(c, eps=eps, max_iter=5000, tol=1e-13)
    exact = entropic_objective(ref.plan, c, eps=eps, potentials=ref.potentials)
    for i in range(3):
        a, b = np.full(10, 1 / 10), np.full(12, 1 / 12)
        t = ot.sinkhorn(a, b, c[i].numpy(), eps, method="sinkhorn_log", stopThr=1e-14)
        hand = (t * c[i].numpy()).sum() + eps * (t * np.log(t / np.outer(a, b))).sum()
        assert exact[i].item() == pytest.approx(hand, abs=1e-10)
    primal_at_fixed_point = entropic_objective(ref.plan, c, eps=eps)
    torch.testing.assert_close(primal_at_fixed_point, exact, atol=1e-12, rtol=0)
    # Before convergence the dual value (from the potentials) is second-order accurate in the
    # marginal error, the plan-only value first-order.
    for it in (40, 80):
        res = sinkhorn(c, eps=eps, max_iter=it, tol=0.0)
        err = res.marginal_error.item()
        dual = entropic_objective(res.plan, c, eps=eps, potentials=res.potentials) - exact
        primal = entropic_objective(res.plan, c, eps=eps) - exact
        assert 1e-9 < err < 1e-2
        assert dual.abs().max().item() <= err**2
        assert primal.abs().max().item() >= 10 * dual.abs().max().item()


@pytest.mark.parametrize("eps, expected", [(0.05, "matmul"), (0.02, "torch")])
def test_known_cost_range_picks_the_kernel_without_measuring(monkeypatch, eps, expected):
    # matmul is exact while range / eps <= 60 in float32 (otface.ot.softmin): 2 / 0.05 = 40,
    # 2 / 0.02 = 100. With the bound given, no row range is measured (no host sync on CUDA).
    sk = importlib.import_module("otface.ot.torch_sinkhorn")
    c = _costs(3, 6, 7, seed=11, dtype=torch.float32)
    built, orig = [], dict(sk.KERNELS)
    kernels = {k: (lambda logk, k=k: built.append(k) or orig[k](logk)) for k in orig}
    monkeypatch.setattr(sk, "KERNELS", kernels)

    def no_measure(*args, **kwargs):
        raise AssertionError("the cost range was measured")

    monkeypatch.setattr(torch.Tensor, "amin", no_measure)
    res = sinkhorn(c, eps=eps, max_iter=300, tol=1e-6, cost_range=2.0)
    # (rebuilt on the problems still iterating each time some stop)
    assert set(built) == {expected}
    monkeypatch.undo()
    ref = sinkhorn(c, eps=eps, max_iter=300, tol=1e-6, kernel="torch")
    torch.testing.assert_close(res.plan, ref.plan, atol=1e-6, rtol=1e-4)


def test_eps_stages_by_hand():
    from otface.ot.sinkhorn import eps_stages

    # 2, 1, 0.5, 0.25, 0.125, 0.0625, then the target 0.05 itself.
    assert eps_stages(0.05, 0.5, 2.0, 50) == [2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]
    assert eps_stages(0.05, 0.5, 2.0, 4) == [0.25, 0.125, 0.0625]  # the last max_iter - 1
    assert eps_stages(0.05, 0.0, 2.0, 50) == [] and eps_stages(0.5, 0.5, 0.4, 50) == []
    assert eps_stages(0.25, 0.5, 2.0, 50) == [2.0, 1.0, 0.5]  # 0.25 is the target, not a stage


@pytest.mark.parametrize("kernel", ["torch", "matmul"])
def test_eps_scaling_reaches_pots_plan(kernel):
    # The annealing only changes where the iteration starts: at a tight tol the plan is POT's.
    c = _costs(3, 8, 11, seed=4)
    eps = 0.05
    res = sinkhorn(
        c, eps=eps, max_iter=5000, tol=1e-12, check_every=1, kernel=kernel, eps_scaling=0.5
    )
    _assert_pot_plans(res, c, eps)


def test_eps_scaling_counts_its_iterations_and_is_refused_out_of_range():
    c = _costs(2, 6, 6, seed=1)
    fixed = sinkhorn(c, eps=0.05, max_iter=9, tol=0.0, eps_scaling=0.5, cost_range=2.0)
    assert fixed.n_iter == 9  # 6 annealing iterations + 3 at eps
    with pytest.raises(ValueError, match="eps_scaling"):
        sinkhorn(c, eps=0.05, max_iter=9, tol=0.0, eps_scaling=1.0)
    # Without a known range the annealing starts at the measured range of the costs: the
    # same solve as with that range given.
    measured = sinkhorn(c, eps=0.05, max_iter=9, tol=0.0, eps_scaling=0.5)
    given = sinkhorn(
        c, eps=0.05, max_iter=9, tol=0.0, eps_scaling=0.5, cost_range=float(c.max() - c.min())
    )
    torch.testing.assert_close(measured.plan, given.plan, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", ["torch", "matmul"])
def test_each_problem_stops_on_its_own_at_a_loose_tol(kernel):
    # At tol 1e-3 the problems need different numbers of iterations; each gets exactly the
    # plan and count it gets when solved alone (the batch no longer runs until the slowest).
    c = _costs(6, 7, 9, seed=2)
    c[1] = 0.7  # a constant cost: a b^T after one iteration
    kw = dict(eps=0.05, max_iter=400, tol=1e-3, kernel=kernel, check_every=1)
    batched = sinkhorn(c, **kw)
    counts = batched.problem_iters.tolist()
    for i in range(c.shape[0]):
        single = sinkhorn(c[i : i + 1], **kw)
        torch.testing.assert_close(batched.plan[i], single.plan[0], atol=1e-12, rtol=0)
        assert counts[i] == single.n_iter
    assert counts[1] == 1 and batched.n_iter == max(counts) and len(set(counts)) > 2
    assert (batched.problem_errors < 1e-3).all()


@pytest.mark.parametrize("kernel", ["torch", "matmul"])
def test_over_relaxation_reaches_pots_plan_in_fewer_iterations(kernel):
    c = _costs(4, 8, 11, seed=4)
    kw = dict(eps=0.05, max_iter=5000, tol=1e-12, check_every=1, kernel=kernel)
    plain = sinkhorn(c, **kw)
    for omega in (1.3, 1.6):
        fast = sinkhorn(c, relaxation=omega, **kw)
        _assert_pot_plans(fast, c, 0.05)
        # Which omega is fastest depends on the problems (1.3 here; 1.6 on the demo's): both
        # take fewer iterations than plain updates.
        assert fast.problem_iters.sum() < (0.6 if omega == 1.3 else 0.9) * plain.problem_iters.sum()


def test_over_relaxation_safeguard_falls_back_to_plain_updates():
    # omega = 1.99 oscillates; the safeguard switches each problem that worsens to plain
    # updates, so every problem still converges, to POT's plan.
    c = _costs(4, 8, 11, seed=5)
    res = sinkhorn(c, eps=0.05, max_iter=20000, tol=1e-10, check_every=1, relaxation=1.99)
    assert (res.problem_errors < 1e-10).all()
    _assert_pot_plans(res, c, 0.05)
    with pytest.raises(ValueError, match="relaxation"):
        sinkhorn(c, eps=0.05, max_iter=5, tol=0.0, relaxation=2.0)
