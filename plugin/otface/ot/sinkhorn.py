"""Batched log-domain Sinkhorn for entropic optimal transport, with envelope gradients.

For each problem ``b`` of a batch, with cost ``C_b`` (``n x m``) and marginals ``a_b``, ``b_b``,
the entropic problem (Cuturi 2013) is

    OT_eps(C) = min_{T >= 0, T 1 = a, T^T 1 = b}  <T, C> + eps * KL(T | a b^T),
    KL(T | a b^T) = sum_ij T_ij (log(T_ij / (a_i b_j)) - 1) + 1                       (1)

The KL form is used throughout: it is >= 0, so ``OT_eps >= 0`` for a non-negative cost, and it
is the convention of the Sinkhorn divergence (Feydy et al. 2019). Equivalently,
``OT_eps = <T, C> - eps * H(T) + eps * (1 - <a, log a> - <b, log b>)`` with
``H(T) = -sum T_ij (log T_ij - 1)``: the same plan and gradient, a constant offset
(``eps * (1 + log n + log m)`` for uniform weights) that cancels in the divergence. The solution
is ``T* = exp(u_i + v_j - C_ij / eps)`` for dual potentials (in units of ``eps``) found by
alternating ``u = log a - LSE_j(-C/eps + v)`` and ``v = log b - LSE_i(-C/eps + u)``.

Gradients follow the envelope theorem: ``dOT_eps/dC = T*`` exactly at the fixed point (the
regulariser does not depend on ``C`` and the constraint set is fixed). The plan is computed
without autograd and held constant; values are written as ``<T*, C>`` plus detached terms, so
autograd returns ``T*`` through ``C`` only:

* :attr:`SinkhornResult.cost` is the transport cost of the entropic plan, ``W = <T*, C>``. Its
  gradient is also taken to be ``T*``, which is **not** ``dW/dC`` (the term ``<dT*/dC, C>`` is
  missing): an approximation, kept for comparison (``otface.distance = "transport"``);
* :func:`entropic_objective` is ``OT_eps`` of (1), whose exact gradient ``T*`` is.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Tuple, Union

import torch

from otface.ot import triton_sinkhorn
from otface.ot.softmin import KERNELS, matmul_max_range

__all__ = [
    "SinkhornResult",
    "sinkhorn",
    "entropic_objective",
    "eps_stages",
    "error_rounding_bound",
    "marginal_error",
    "marginals",
    "problem_marginal_errors",
    "transport_cost",
]

KERNEL_CHOICES = ("auto",) + tuple(KERNELS) + ("triton",)
_warned_no_convergence = False


class SinkhornResult(NamedTuple):
    """Result of a batch of entropic OT solves.

    Attributes:
        plan: ``(B, n, m)`` entropic plans ``T*`` (no autograd history), float32 or float64.
        cost: ``(B,)`` transport costs ``<T*, C>``; differentiable w.r.t. ``C`` with gradient
            ``T*`` (the envelope gradient of ``OT_eps``, only an approximation of ``d<T*,C>/dC``).
        n_iter: number of Sinkhorn iterations run (one iteration updates both potentials),
            the largest of ``problem_iters``: an int, or with the Triton kernel a 0-d int32
            tensor on the device (reading it on the host is a device sync).
        marginal_error: 0-d tensor, the largest finite one of ``problem_errors`` (a problem
            whose plan holds NaN/Inf is left out here; its plan and cost show it).
        potentials: ``((B, n), (B, m))`` log-scalings ``(u, v)`` in units of ``eps`` with
            ``plan = exp(u_i + v_j - C_ij / eps)``, or None when the solver gives none.
        problem_iters: ``(B,)`` int32 iterations each problem ran (each stops on its own),
            on the device; None from solvers that do not say (POT).
        problem_errors: ``(B,)`` L1 marginal error of each problem's plan (the larger of rows
            and columns), on the device; None from solvers that do not say (POT). From our
            solver it is the error its stop test measured at the problem's last iteration,
            so a problem that stopped on ``tol`` has ``problem_errors < tol`` exactly. That
            measurement (from the iteration's log-sum-exps) and the exact error of ``plan``
            (its rows and columns summed exactly) differ by rounding, at most
            :func:`error_rounding_bound`.
    """

    plan: torch.Tensor
    cost: torch.Tensor
    n_iter: Union[int, torch.Tensor]
    marginal_error: torch.Tensor
    potentials: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    problem_iters: Optional[torch.Tensor] = None
    problem_errors: Optional[torch.Tensor] = None


def marginals(
    a: Optional[torch.Tensor], size: int, batch: int, like: torch.Tensor, name: str
) -> torch.Tensor:
    """``(batch, size)`` weights in ``like``'s dtype and device: ``a`` (``(batch, size)`` or
    ``(size,)``, detached) checked for shape, or uniform ``1 / size`` when None. ``name`` is
    ``"a"`` or ``"b"``, for the error messages."""
    if size == 0:
        # A distribution with no points has no probability weights: OT is undefined.
        raise ValueError(
            f"sinkhorn: the {'source' if name == 'a' else 'target'} distributions have no "
            f"points ({'n' if name == 'a' else 'm'} = 0); each needs at least one"
        )
    if a is None:
        return torch.full((batch, size), 1.0 / size, dtype=like.dtype, device=like.device)
    a = a.detach().to(device=like.device, dtype=like.dtype)
    if a.dim() == 1:
        a = a.unsqueeze(0).expand(batch, -1)
    if tuple(a.shape) != (batch, size):
        raise ValueError(
            f"sinkhorn: marginal {name} must have shape ({batch}, {size}) or "
            f"({size},), got {tuple(a.shape)}"
        )
    return a


def transport_cost(plan: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """``<plan, cost>`` per problem, differentiable w.r.t. ``cost`` only (gradient ``plan``).

    Entries that carry no mass (``plan == 0``) contribute exactly 0, whatever their cost: a
    ``+inf`` cost that the plan avoids gives a finite value and a finite gradient, not
    ``0 * inf = NaN``. A NaN in the plan still propagates.

    Args:
        plan: ``(B, n, m)`` transport plans (detached here).
        cost: ``(B, n, m)`` costs; cast to the plan's dtype.

    Returns:
        ``(B,)`` transport costs.
    """
    t = plan.detach()
    with torch.autocast(device_type=cost.device.type, enabled=False):
        weighted = torch.where(t == 0, 0.0, t * cost.to(t.dtype))
        return weighted.sum(dim=(-2, -1))


def entropic_objective(
    plan: torch.Tensor,
    cost: torch.Tensor,
    *,
    eps: float,
    potentials: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``OT_eps(C) = <T*, C> + eps * KL(T* | a b^T)`` (eq. 1 of this module), envelope gradient.

    The value is ``<T, C>`` (differentiable w.r.t. ``C``, gradient ``T``) plus a detached
    remainder, so that ``d value / d C = T``, which is the exact gradient of ``OT_eps`` at the
    Sinkhorn fixed point ``T = T*``. The remainder is computed

    * from the dual potentials when given (the plan must be ``exp(u_i + v_j - C_ij / eps)``):
      ``OT_eps = eps * (<u, a> + <v, b> - <a, log a> - <b, log b> - sum T + 1)``, i.e. the
      dual objective ``<f, a> + <g, b> - eps <exp((f + g - C) / eps), a b^T> + eps`` with
      ``f = eps (u - log a)``, ``g = eps (v - log b)``. Before convergence it is off from
      ``OT_eps`` by second-order terms in the marginal error;
    * otherwise from the plan (primal form (1), first-order in the marginal error).

    Both are equal at convergence.

    Args:
        plan: ``(B, n, m)`` plans (detached here).
        cost: ``(B, n, m)`` costs.
        eps: entropic regularisation.
        potentials: optional ``((B, n), (B, m))`` log-scalings of ``plan`` (units of ``eps``).
        a: ``(B, n)`` or ``(n,)`` source weights; uniform if None.
        b: ``(B, m)`` or ``(m,)`` target weights; uniform if None.

    Returns:
        ``(B,)`` values, differentiable w.r.t. ``cost``.
    """
    t = plan.detach()
    linear = transport_cost(t, cost)
    batch, n, m = t.shape
    with torch.no_grad(), torch.autocast(device_type=t.device.type, enabled=False):
        a_ = marginals(a, n, batch, t, "a")
        b_ = marginals(b, m, batch, t, "b")
        mass = t.sum(dim=(-2, -1))
        neg_ent_ab = (torch.xlogy(a_, a_).sum(-1) + torch.xlogy(b_, b_).sum(-1)).neg()
        if potentials is not None:
            u, v = (p.detach().to(t.dtype) for p in potentials)
            # A zero weight has potential -inf and contributes nothing (not 0 * inf).
            ua = torch.where(a_ == 0, 0.0, u * a_).sum(-1)
            vb = torch.where(b_ == 0, 0.0, v * b_).sum(-1)
            value = eps * (ua + vb + neg_ent_ab - mass + 1.0)
        else:
            # sum T log(T / (a b^T)) = sum T log T - <T 1, log a> - <T^T 1, log b>
            kl = (
                torch.xlogy(t, t).sum(dim=(-2, -1))
                - torch.xlogy(t.sum(-1), a_).sum(-1)
                - torch.xlogy(t.sum(-2), b_).sum(-1)
            )
            value = linear.detach() + eps * (kl - mass + 1.0)
        rest = value - linear.detach()
    return linear + rest


def problem_marginal_errors(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B,)`` L1 marginal deviation of each plan (the larger of rows and columns)."""
    return torch.maximum(
        (plan.sum(dim=-1) - a).abs().sum(dim=-1), (plan.sum(dim=-2) - b).abs().sum(dim=-1)
    )


def marginal_error(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Largest L1 marginal deviation over the problems whose deviation is finite (0-d tensor).

    A problem with NaN/Inf in its plan (a NaN or infeasible cost) is left out, so that it can
    neither hide the others' error nor, in :func:`sinkhorn`, keep them from stopping early.

    Args:
        plan: ``(B, n, m)`` plans.
        a: ``(B, n)`` source weights.
        b: ``(B, m)`` target weights.
    """
    return _finite_max(problem_marginal_errors(plan, a, b))


def error_rounding_bound(
    cost: torch.Tensor, potentials: Tuple[torch.Tensor, torch.Tensor], *, eps: float
) -> torch.Tensor:
    """``(B,)`` bound on how far a solve's ``problem_errors`` can be from the exact L1 marginal
    error of its plan (rows and columns summed exactly), for weights of mass one:

        16 u (X + n + m + 1),   X = max_ij |C_ij| / eps + max_i |u_i| + max_j |v_j|

    over the finite entries, ``u`` the unit roundoff of the solve's dtype (``2^-24`` in
    float32, ``2^-53`` in float64). Both are sums of the same terms
    ``exp(u_i + v_j - C_ij / eps)`` evaluated in two orders (log-sum-exp then ``exp``, or
    ``exp`` then sum). To first order each rounded exponent moves a term by at most ``u``
    times the magnitudes in ``X`` (relatively), each sum by ``n`` or ``m`` times ``u``; the
    factor 16 covers the operations of both evaluations with an ``exp`` and a ``log`` that are
    off by a few ulps. Measured on random cosine costs (eps 0.02 to 0.3, n, m 5 to 40, plain
    and relaxed updates): under a twentieth of it.

    Args:
        cost: ``(B, n, m)`` costs of the solve.
        potentials: ``((B, n), (B, m))`` its ``potentials`` (log-scalings, units of eps).
        eps: its entropic regularisation.
    """
    u, v = (p.detach() for p in potentials)
    n, m = cost.shape[-2:]
    c = cost.detach().to(u.dtype)
    x = _finite_abs(c).amax(dim=(-2, -1)) / eps + _finite_abs(u).amax(-1) + _finite_abs(v).amax(-1)
    return 16 * (torch.finfo(u.dtype).eps / 2) * (x + n + m + 1)


def _finite_abs(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t.abs(), 0.0)


def _finite_max(err: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(err), err, 0.0).amax() if err.numel() else err.new_zeros(())


def _pick_kernel(
    kernel: str, logk: torch.Tensor, *, eps: float, cost_range: Optional[float]
) -> str:
    if kernel != "auto":
        return kernel
    # The largest row range of K = -C/eps decides whether the exponentiated kernel is exact in
    # this dtype (see otface.ot.softmin). A known bound on the cost decides without looking;
    # otherwise one reduction and one host sync per solve.
    if cost_range is not None:
        return "matmul" if cost_range / eps <= matmul_max_range(logk.dtype) else "torch"
    row_range = (logk.amax(dim=-1) - logk.amin(dim=-1)).amax()
    return "matmul" if float(row_range) <= matmul_max_range(logk.dtype) else "torch"


def sinkhorn(
    cost: torch.Tensor,
    *,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    eps: float,
    max_iter: int,
    tol: float,
    check_every: Optional[int] = None,
    kernel: str = "auto",
    cost_range: Optional[float] = None,
    symmetric: Optional[torch.Tensor] = None,
    eps_scaling: float = 0.0,
    relaxation: float = 1.0,
    warn: bool = True,
) -> SinkhornResult:
    """Solve a batch of entropic OT problems with log-domain Sinkhorn.

    All problems are solved together (no Python loop over problems). The solve runs in float32
    (float64 inputs stay float64) with autocast disabled, whatever the input dtype, and without
    autograd; only ``result.cost`` carries a gradient, ``d cost / d C = plan`` (see the module
    docstring: exact for ``OT_eps``, approximate for ``<T*, C>``); pass the result's plan and
    potentials to :func:`entropic_objective` for ``OT_eps``.

    Each problem stops on its own: convergence is checked every ``check_every`` iterations
    and at the last one (with the torch kernels each check reads the problems' errors on the
    host, i.e. one device sync on CUDA), and a problem whose L1 marginal error is below
    ``tol`` leaves the batch, which iterates on with the others. The error is that of the
    current plan ``exp(u_i + v_j - C_ij / eps)``, the larger of its row and column errors
    (both: over-relaxed updates leave the columns inexact), computed from the iteration's
    log-sum-exps; it is the one reported in ``problem_errors``, so the stop decision and the
    report agree exactly. A problem gets the plan it gets when solved alone. Problems whose
    error is not finite (a NaN cost) leave too, so they cannot keep the others iterating.
    ``tol <= 0`` runs exactly ``max_iter`` iterations.

    An empty batch (``B = 0``) gives an empty result whose ``cost`` is still connected to the
    graph of ``cost``; a distribution with no points (``n = 0`` or ``m = 0``) raises
    :class:`ValueError`.

    Args:
        cost: ``(B, n, m)`` cost matrices.
        a: ``(B, n)`` or ``(n,)`` source weights (non-negative, summing to one); uniform if
            None. A zero weight takes its point out of the problem: its potential is
            ``-inf``, its row of the plan exactly 0, and nothing of it reaches the value or the
            gradient (masked ViT tokens); each problem needs one positive weight at least.
        b: ``(B, m)`` or ``(m,)`` target weights; uniform if None (zeros as for ``a``).
        eps: entropic regularisation (in the units of the cost), > 0.
        max_iter: maximum number of iterations, >= 1.
        tol: stopping tolerance on the marginal error.
        check_every: iterations between convergence checks, >= 1. None: every iteration
            where a check reads nothing on the host (CPU tensors, the Triton kernel), which lets
            each problem stop as soon as it can; every 5 on the torch kernels on a GPU, where
            each check is a device sync.
        kernel: ``"torch"`` (reference softmin), ``"matmul"`` (exponentiated kernel, see
            :mod:`otface.ot.softmin`), ``"triton"`` (the fused whole-solve kernel of
            :mod:`otface.ot.triton_sinkhorn`: float32, ``n, m <= 256``, CUDA tensors or CPU
            tensors under ``TRITON_INTERPRET=1``) or ``"auto"``: ``"triton"`` for float32
            solves on CUDA with ``n, m <= 64`` when Triton is installed, else ``"matmul"``
            when it is exact for this cost and eps, else ``"torch"``. The Triton kernel stops
            each problem on its own (a problem gets the result it gets when solved alone) and
            reads nothing on the host: ``n_iter`` is then a device tensor, per-problem counts
            and errors come in ``problem_iters`` and ``problem_errors``, and non-convergence
            is not warned about (``marginal_error`` shows it).
        cost_range: an upper bound on ``max_j C_ij - min_j C_ij`` for every row, known to the
            caller (2 for :func:`otface.ot.cosine_cost`); lets ``kernel="auto"`` choose
            without reading the cost on the host. None: measured.
        symmetric: optional ``(B,)`` bool mask of problems that the caller knows to be
            symmetric (``C = C^T``, ``a = b``; needs ``n = m``), such as the self-terms
            ``OT_eps(alpha, alpha)`` of the Sinkhorn divergence. They take averaged updates
            ``u <- (v + T(v)) / 2`` (Feydy et al. 2019, as in GeomLoss), with the same fixed
            point: alternating updates oscillate on them (their plan is close to diagonal) and
            can need thousands of iterations where the averaged ones need tens.
        eps_scaling: ε-scaling (annealing, as in GeomLoss): with ``q`` in ``(0, 1)``, the
            solve starts at ``eps_0`` = the cost's range (``cost_range``, else measured) and
            runs one iteration at each of ``eps_0, eps_0 q, eps_0 q^2, ...`` while above
            ``eps``, carrying the dual potentials (in cost units) from one to the next, then
            iterates at ``eps`` until ``tol`` as without it. These iterations count towards
            ``max_iter`` (at least one runs at ``eps``). ``0``: off, the solve starts at
            ``eps`` from zero potentials.
        relaxation: over-relaxation ``omega`` in ``[1, 2)`` of the non-symmetric problems'
            updates, ``u <- u + omega (T(u) - u)`` (Thibault et al. 2017, "Overrelaxed
            Sinkhorn-Knopp"): the same fixed point, reached in fewer iterations at small eps
            (1.6: about 2.6 times fewer in all on the demo's problems at tol 3e-4).
            Safeguarded: a problem whose marginal error at a check is more than twice its best
            so far goes on with plain updates. ``1``: plain Sinkhorn. The eps-scaling
            iterations are plain.
        warn: warn once per process when a solve stops at ``max_iter`` above ``tol`` (torch
            kernels; the trainer warns on the fraction of unconverged problems instead).

    Returns:
        :class:`SinkhornResult` (with its ``potentials``).

    Raises:
        ValueError: a cost that is not 3-D, ``n = 0`` or ``m = 0``, bad marginal shapes, or
            ``eps``, ``max_iter``, ``check_every`` out of range.
    """
    if cost.dim() != 3:
        raise ValueError(f"sinkhorn: cost must be (B, n, m), got shape {tuple(cost.shape)}")
    if not eps > 0:
        raise ValueError(f"sinkhorn: eps must be > 0, got {eps!r}")
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"sinkhorn: unknown kernel {kernel!r}; choices: {KERNEL_CHOICES}")
    if check_every is None:
        on_device = cost.device.type != "cpu" and not (
            kernel == "triton" or (kernel == "auto" and triton_sinkhorn.auto_fits(cost))
        )
        check_every = 5 if on_device else 1
    if max_iter < 1 or check_every < 1:
        raise ValueError(
            f"sinkhorn: max_iter and check_every must be >= 1, got {max_iter!r}, {check_every!r}"
        )
    if not 0.0 <= eps_scaling < 1.0:
        raise ValueError(f"sinkhorn: eps_scaling must be in [0, 1) (0: off), got {eps_scaling!r}")
    if not 1.0 <= relaxation < 2.0:
        raise ValueError(f"sinkhorn: relaxation must be in [1, 2) (1: off), got {relaxation!r}")
    batch, n, m = cost.shape
    dtype = torch.promote_types(cost.dtype, torch.float32)
    like = cost.new_empty((), dtype=dtype)  # dtype and device of the solve
    a_ = marginals(a, n, batch, like, "a")
    b_ = marginals(b, m, batch, like, "b")
    if symmetric is not None:
        if tuple(symmetric.shape) != (batch,) or n != m:
            raise ValueError(
                f"sinkhorn: symmetric must be a ({batch},) mask of square problems, got shape "
                f"{tuple(symmetric.shape)} for costs {tuple(cost.shape)}"
            )
        symmetric = symmetric.to(device=cost.device, dtype=torch.bool).unsqueeze(-1)
    if batch == 0:
        # Built outside no_grad: the (empty) cost stays connected to the caller's graph.
        plan = like.new_zeros((0, n, m))
        potentials = (like.new_zeros((0, n)), like.new_zeros((0, m)))
        return SinkhornResult(plan, transport_cost(plan, cost), 0, like.new_zeros(()), potentials)
    stages = eps_stages(
        eps, eps_scaling, _cost_diameter(cost, cost_range) if eps_scaling else eps, max_iter
    )
    if kernel == "triton" or (kernel == "auto" and triton_sinkhorn.auto_fits(cost)):
        return _sinkhorn_triton(
            cost,
            a_,
            b_,
            eps=eps,
            max_iter=max_iter,
            tol=tol,
            check_every=check_every,
            symmetric=symmetric,
            stages=stages,
            eps_scaling=eps_scaling,
            relaxation=relaxation,
        )
    with torch.no_grad(), torch.autocast(device_type=cost.device.type, enabled=False):
        c = cost.detach().to(dtype)
        log_a, log_b = torch.log(a_), torch.log(b_)
        u = torch.zeros_like(a_)
        v = torch.zeros_like(b_)
        for k, stage_eps in enumerate(stages):
            # One iteration at a larger eps, then the potentials carried to the next eps: the
            # dual potentials f = eps (u - log a), g = eps (v - log b) are kept fixed.
            stage_logk = c * (-1.0 / stage_eps)
            pick = _pick_kernel(kernel, stage_logk, eps=stage_eps, cost_range=cost_range)
            stage = KERNELS[pick](stage_logk)
            u, v, _ = _iterate(stage, stage.row(v), u, v, log_a, log_b, symmetric, None)
            ratio = stage_eps / (stages[k + 1] if k + 1 < len(stages) else eps)
            u = torch.where(a_ > 0, log_a + (u - log_a) * ratio, u)
            v = torch.where(b_ > 0, log_b + (v - log_b) * ratio, v)
        logk = c * (-1.0 / eps)
        pick = _pick_kernel(kernel, logk, eps=eps, cost_range=cost_range)
        # Each problem stops on its own, as in the Triton kernel: at a check, the problems
        # below tol leave the batch (their potentials are stored), and only the others iterate
        # on. A problem whose error is not finite (a NaN cost) leaves too: it must not keep the
        # rest iterating until max_iter.
        u_all, v_all = u.clone(), v.clone()
        iters_all = torch.full((batch,), max(len(stages), 0), dtype=torch.int32)
        errors = torch.full((batch,), float("nan"), dtype=dtype, device=c.device)
        omega = torch.full((batch, 1), float(relaxation), dtype=dtype, device=c.device)
        live = _Subset(
            torch.arange(batch, device=c.device),
            logk,
            log_a,
            log_b,
            a_,
            b_,
            symmetric,
            omega if relaxation != 1.0 else None,
            torch.full((batch,), float("inf"), dtype=dtype, device=c.device),
        )
        ker = KERNELS[pick](live.logk)
        lse_row = ker.row(v)
        n_iter, converged = len(stages), False
        for n_iter in range(len(stages) + 1, max_iter + 1):
            u, v, lse_col = _iterate(
                ker, lse_row, u, v, live.log_a, live.log_b, live.sym, live.omega
            )
            lse_row = ker.row(v)  # reused by the next u update, and by the check below
            if tol > 0 and (n_iter % check_every == 0 or n_iter == max_iter):
                err = _iterate_errors(u, v, lse_row, lse_col, live.a, live.b)
                done = (err < tol) | ~torch.isfinite(err)
                if live.omega is not None:
                    # The safeguard: a relaxed problem whose error has grown to more than twice
                    # its best so far goes on with plain updates (which cannot diverge).
                    # Smaller rises are normal in relaxed iterations; reacting to them costs
                    # the speed-up (measured: the slowest demo problem 1201 iterations, against
                    # 440).
                    live.omega.masked_fill_((err > 2 * live.best_err).unsqueeze(-1), 1.0)
                    torch.minimum(live.best_err, err, out=live.best_err)
                if bool(done.any()):
                    leaving = live.index[done]
                    u_all[leaving], v_all[leaving] = u[done], v[done]
                    errors[leaving] = err[done]
                    iters_all[leaving.cpu()] = n_iter
                    if bool(done.all()):
                        converged = True
                        break
                    keep = (~done).nonzero().squeeze(1)
                    live = live.select(keep)
                    u, v, lse_row, err = u[keep], v[keep], lse_row[keep], err[keep]
                    ker = KERNELS[pick](live.logk)
        if not converged:
            if tol <= 0:  # no check ran: the error of the last iterate
                err = _iterate_errors(u, v, lse_row, lse_col, live.a, live.b)
            u_all[live.index], v_all[live.index] = u, v
            errors[live.index] = err
            iters_all[live.index.cpu()] = n_iter
        u, v = u_all, v_all
        plan = torch.exp(logk.add_(u.unsqueeze(-1)).add_(v.unsqueeze(-2)))
        err = _finite_max(errors)
        n_iter = int(iters_all.max())
    global _warned_no_convergence
    if warn and tol > 0 and not converged and not _warned_no_convergence:
        _warned_no_convergence = True
        warnings.warn(
            f"sinkhorn did not reach tol={tol} in max_iter={max_iter} iterations "
            f"(eps={eps}); the plan is used as is (warned once)",
            RuntimeWarning,
            stacklevel=2,
        )
    return SinkhornResult(
        plan, transport_cost(plan, cost), n_iter, err, (u, v), iters_all.to(c.device), errors
    )


class _Subset(NamedTuple):
    """The problems of a solve that still iterate: their indices in the batch and their data."""

    index: torch.Tensor
    logk: torch.Tensor
    log_a: torch.Tensor
    log_b: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    sym: Optional[torch.Tensor]
    omega: Optional[torch.Tensor]  # (k, 1) relaxation of each problem; None: plain updates
    best_err: torch.Tensor  # (k,) smallest error at a check so far

    def select(self, keep: torch.Tensor) -> "_Subset":
        return _Subset(*(None if t is None else t[keep] for t in self))


def _iterate(ker, lse_row, u, v, log_a, log_b, symmetric, omega):
    """One Sinkhorn iteration (both potentials) on kernel ``ker`` from ``lse_row = ker.row(v)``,
    over-relaxed by ``omega`` (``(B, 1)``, or None for plain updates) and averaged on the
    ``symmetric`` problems; returns the new ``u``, ``v`` and ``lse_col``."""
    u = _step(u, log_a - lse_row, v, log_a, symmetric, omega)
    lse_col = ker.col(u)
    v = _step(v, log_b - lse_col, u, log_b, symmetric, omega)
    return u, v, lse_col


def _iterate_errors(u, v, lse_row, lse_col, a, b):
    """``(k,)`` L1 marginal error of the plans ``exp(u_i + v_j + K_ij)`` of an iteration, the
    larger of rows and columns, from its log-sum-exps ``lse_row = LSE_j(K + v)`` and
    ``lse_col = LSE_i(K + u)`` (the ``u`` that gave ``v``): what the stop test compares with
    ``tol``, and what the solve reports."""
    rows = (torch.exp(u + lse_row) - a).abs().sum(dim=-1)
    cols = (torch.exp(v + lse_col) - b).abs().sum(dim=-1)
    return torch.maximum(rows, cols)


def _step(old, target, other, log_w, symmetric, omega):
    new = target
    if omega is not None:
        # (1 - omega) * old + omega * target; a zero weight keeps its -inf potential.
        new = torch.where(torch.isfinite(log_w), old + omega * (target - old), target)
    if symmetric is not None:
        new = torch.where(symmetric, 0.5 * (other + target), new)
    return new


def eps_stages(eps: float, scaling: float, diameter: float, max_iter: int) -> list:
    """The eps of each annealing iteration before ``eps`` (see ``sinkhorn``'s ``eps_scaling``):
    ``diameter * scaling^k`` while above ``eps``, at most ``max_iter - 1`` of them (the first
    ones are dropped when there are more). Empty when ``scaling`` is 0 or ``diameter <= eps``."""
    if not scaling or not diameter > eps:
        return []
    out, e = [], float(diameter)
    while e > eps * (1 + 1e-9):
        out.append(e)
        e *= scaling
    return out[max(0, len(out) - (max_iter - 1)) :]


def _cost_diameter(cost: torch.Tensor, cost_range: Optional[float]) -> float:
    # The start of the annealing: the largest cost difference (a host read when not known).
    if cost_range is not None:
        return float(cost_range)
    if cost.numel() == 0:
        return 0.0
    finite = cost.detach()[torch.isfinite(cost.detach())]
    return float(finite.max() - finite.min()) if finite.numel() else 0.0


def _sinkhorn_triton(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    eps: float,
    max_iter: int,
    tol: float,
    check_every: int,
    symmetric: Optional[torch.Tensor],
    stages: list,
    eps_scaling: float,
    relaxation: float,
) -> SinkhornResult:
    with torch.no_grad():
        sol = triton_sinkhorn.sinkhorn_triton(
            cost,
            a,
            b,
            eps=eps,
            max_iter=max_iter,
            tol=tol,
            check_every=check_every,
            symmetric=symmetric,
            eps_start=stages[0] if stages else eps,
            n_stages=len(stages),
            eps_scaling=eps_scaling,
            relaxation=relaxation,
        )
        err = _finite_max(sol.errors)
        n_iter = sol.iters.amax()
    return SinkhornResult(
        sol.plan,
        transport_cost(sol.plan, cost),
        n_iter,
        err,
        (sol.u, sol.v),
        sol.iters,
        sol.errors,
    )
