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

:func:`sinkhorn` checks its arguments and hands the batch to the torch iteration
(:mod:`otface.ot.torch_sinkhorn`) or to the fused Triton kernel
(:mod:`otface.ot.triton_sinkhorn`). The values of its plans and their envelope gradients
(``dOT_eps/dC = T*``) are in :mod:`otface.ot.objective`, the weights and marginal errors in
:mod:`otface.ot.marginals`; their functions are importable from here too.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Tuple, Union

import torch

from otface.ot import torch_sinkhorn, triton_sinkhorn
from otface.ot.marginals import (
    error_rounding_bound,
    largest_error,
    marginal_error,
    marginals,
    problem_marginal_errors,
)
from otface.ot.objective import entropic_objective, transport_cost
from otface.ot.softmin import KERNELS

__all__ = [
    "SinkhornResult",
    "sinkhorn",
    "eps_stages",
    # defined in otface.ot.objective and otface.ot.marginals, importable from here too
    "entropic_objective",
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
    autograd; only ``result.cost`` carries a gradient, ``d cost / d C = plan`` (see
    :mod:`otface.ot.objective`: exact for ``OT_eps``, approximate for ``<T*, C>``); pass the
    result's plan and potentials to :func:`entropic_objective` for ``OT_eps``.

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
    # What both paths take: the updates and the stop rule (each stops every problem on its own).
    updates = dict(eps=eps, symmetric=symmetric, relaxation=relaxation)
    stop = dict(max_iter=max_iter, tol=tol, check_every=check_every)
    if kernel == "triton" or (kernel == "auto" and triton_sinkhorn.auto_fits(cost)):
        with torch.no_grad():
            sol = triton_sinkhorn.sinkhorn_triton(
                cost,
                a_,
                b_,
                eps_start=stages[0] if stages else eps,
                n_stages=len(stages),
                eps_scaling=eps_scaling,
                **updates,
                **stop,
            )
            n_iter = sol.iters.amax()  # stays on the device
    else:
        sol = torch_sinkhorn.sinkhorn_torch(
            cost, a_, b_, stages=stages, kernel=kernel, cost_range=cost_range, **updates, **stop
        )
        n_iter = sol.n_iter
        _warn_once_if_unconverged(warn and tol > 0 and not sol.converged, tol, max_iter, eps)
    return SinkhornResult(
        sol.plan,
        transport_cost(sol.plan, cost),
        n_iter,
        largest_error(sol.errors),
        (sol.u, sol.v),
        sol.iters,
        sol.errors,
    )


def _warn_once_if_unconverged(unconverged: bool, tol: float, max_iter: int, eps: float) -> None:
    global _warned_no_convergence
    if unconverged and not _warned_no_convergence:
        _warned_no_convergence = True
        warnings.warn(
            f"sinkhorn did not reach tol={tol} in max_iter={max_iter} iterations "
            f"(eps={eps}); the plan is used as is (warned once)",
            RuntimeWarning,
            stacklevel=3,
        )


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
