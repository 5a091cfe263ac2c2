"""Batched log-domain Sinkhorn for entropic optimal transport, with envelope gradients.

For each problem ``b`` of a batch, with cost ``C_b`` (``n x m``) and marginals ``a_b``, ``b_b``,
the entropic problem (Cuturi 2013) is

    OT_eps(C) = min_{T >= 0, T 1 = a, T^T 1 = b}  <T, C> - eps * H(T),   H(T) = -sum T log T.

Its solution is ``T* = exp(u_i + v_j - C_ij / eps)`` for dual potentials (in units of ``eps``)
found by alternating ``u = log a - LSE_j(-C/eps + v)`` and ``v = log b - LSE_i(-C/eps + u)``.

Gradients follow the envelope theorem: ``dOT_eps/dC = T*``. This module reports the transport
cost of the entropic plan, ``W = <T*, C>``, and differentiates it with ``T*`` held constant (the
plan is computed without autograd), so ``dW/dC`` is taken to be ``T*`` as well; this is the
gradient used by the OTFace loss. :func:`entropic_objective` gives the regularised value whose
exact gradient ``T*`` is.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch

from otface.ot.softmin import KERNELS, matmul_max_range

__all__ = ["SinkhornResult", "sinkhorn", "entropic_objective", "transport_cost"]

KERNEL_CHOICES = ("auto",) + tuple(KERNELS)
_warned_no_convergence = False


class SinkhornResult(NamedTuple):
    """Result of a batch of entropic OT solves.

    Attributes:
        plan: ``(B, n, m)`` entropic plans ``T*`` (no autograd history), float32 or float64.
        cost: ``(B,)`` transport costs ``<T*, C>``; differentiable w.r.t. ``C`` with gradient
            ``T*`` (envelope rule).
        n_iter: number of Sinkhorn iterations run (one iteration updates both potentials).
        marginal_error: 0-d tensor, largest over problems of the L1 deviation of both
            marginals of ``plan`` from ``a`` and ``b``.
    """

    plan: torch.Tensor
    cost: torch.Tensor
    n_iter: int
    marginal_error: torch.Tensor


def _marginals(
    a: Optional[torch.Tensor], size: int, batch: int, like: torch.Tensor, name: str
) -> torch.Tensor:
    if a is None:
        return torch.full((batch, size), 1.0 / size, dtype=like.dtype, device=like.device)
    a = a.to(device=like.device, dtype=like.dtype)
    if a.dim() == 1:
        a = a.unsqueeze(0).expand(batch, -1)
    if tuple(a.shape) != (batch, size):
        raise ValueError(
            f"sinkhorn: marginal {name} must have shape ({batch}, {size}) or "
            f"({size},), got {tuple(a.shape)}"
        )
    return a


def transport_cost(plan: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """``<plan, cost>`` per problem, differentiable w.r.t. ``cost`` only.

    Args:
        plan: ``(B, n, m)`` transport plans (detached here).
        cost: ``(B, n, m)`` costs; cast to the plan's dtype.

    Returns:
        ``(B,)`` transport costs.
    """
    with torch.autocast(device_type=cost.device.type, enabled=False):
        return (plan.detach() * cost.to(plan.dtype)).sum(dim=(-2, -1))


def entropic_objective(plan: torch.Tensor, cost: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Regularised objective ``<T, C> - eps * H(T)`` at a fixed plan ``T`` (``H = -sum T log T``).

    At the optimal plan ``T*`` of ``cost`` this is ``OT_eps(C)``, and its gradient with respect
    to ``C`` (the plan held constant) is exactly ``T*`` by the envelope theorem.

    Args:
        plan: ``(B, n, m)`` plans (detached here).
        cost: ``(B, n, m)`` costs.
        eps: entropic regularisation.

    Returns:
        ``(B,)`` objective values, differentiable w.r.t. ``cost``.
    """
    t = plan.detach()
    neg_entropy = torch.xlogy(t, t).sum(dim=(-2, -1))
    return transport_cost(t, cost) + eps * neg_entropy


def _pick_kernel(
    kernel: str, logk: torch.Tensor, *, eps: float, cost_range: Optional[float]
) -> str:
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"sinkhorn: unknown kernel {kernel!r}; choices: {KERNEL_CHOICES}")
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
    check_every: int = 5,
    kernel: str = "auto",
    cost_range: Optional[float] = None,
) -> SinkhornResult:
    """Solve a batch of entropic OT problems with log-domain Sinkhorn.

    All problems are solved together (no Python loop over problems). The solve runs in float32
    (float64 inputs stay float64) with autocast disabled, whatever the input dtype, and without
    autograd; only ``result.cost`` carries a gradient, ``d cost / d C = plan``.

    Convergence is checked every ``check_every`` iterations and at the last one (each check
    reads one number on the host, i.e. one device sync on CUDA): the solve stops when the
    largest L1 deviation of the row marginals (the column marginals are exact after each
    iteration) falls below ``tol``. ``tol <= 0`` runs exactly ``max_iter`` iterations.

    Args:
        cost: ``(B, n, m)`` cost matrices.
        a: ``(B, n)`` or ``(n,)`` source weights (positive, summing to one); uniform if None.
        b: ``(B, m)`` or ``(m,)`` target weights; uniform if None.
        eps: entropic regularisation (in the units of the cost), > 0.
        max_iter: maximum number of iterations, >= 1.
        tol: stopping tolerance on the marginal error.
        check_every: iterations between convergence checks, >= 1.
        kernel: softmin kernel: ``"auto"`` (the fast ``"matmul"`` kernel when it is exact for
            this cost and eps, else the reference), ``"torch"`` or ``"matmul"``.
        cost_range: an upper bound on ``max_j C_ij - min_j C_ij`` for every row, known to the
            caller (2 for :func:`otface.ot.cosine_cost`); lets ``kernel="auto"`` choose
            without reading the cost on the host. None: measured.

    Returns:
        :class:`SinkhornResult`.
    """
    if cost.dim() != 3:
        raise ValueError(f"sinkhorn: cost must be (B, n, m), got shape {tuple(cost.shape)}")
    if not eps > 0:
        raise ValueError(f"sinkhorn: eps must be > 0, got {eps!r}")
    if max_iter < 1 or check_every < 1:
        raise ValueError(
            f"sinkhorn: max_iter and check_every must be >= 1, got {max_iter!r}, {check_every!r}"
        )
    batch, n, m = cost.shape
    dtype = torch.promote_types(cost.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(device_type=cost.device.type, enabled=False):
        logk = cost.detach().to(dtype) * (-1.0 / eps)
        a_ = _marginals(a, n, batch, logk, "a")
        b_ = _marginals(b, m, batch, logk, "b")
        if batch == 0 or n == 0 or m == 0:
            plan = torch.zeros_like(logk)
            return SinkhornResult(plan, transport_cost(plan, cost), 0, logk.new_zeros(()))
        log_a, log_b = torch.log(a_), torch.log(b_)
        ker = KERNELS[_pick_kernel(kernel, logk, eps=eps, cost_range=cost_range)](logk)

        v = torch.zeros_like(b_)
        lse_row = ker.row(v)
        n_iter, converged = 0, False
        for n_iter in range(1, max_iter + 1):
            u = log_a - lse_row
            v = log_b - ker.col(u)
            lse_row = ker.row(v)  # reused by the next u update, and by the check below
            if tol > 0 and (n_iter % check_every == 0 or n_iter == max_iter):
                row_err = (torch.exp(u + lse_row) - a_).abs().sum(dim=-1).amax()
                if float(row_err) < tol:
                    converged = True
                    break

        plan = torch.exp(logk.add_(u.unsqueeze(-1)).add_(v.unsqueeze(-2)))
        err = torch.maximum(
            (plan.sum(dim=-1) - a_).abs().sum(dim=-1).amax(),
            (plan.sum(dim=-2) - b_).abs().sum(dim=-1).amax(),
        )
    global _warned_no_convergence
    if tol > 0 and not converged and not _warned_no_convergence:
        _warned_no_convergence = True
        warnings.warn(
            f"sinkhorn did not reach tol={tol} in max_iter={max_iter} iterations "
            f"(eps={eps}); the plan is used as is (warned once)",
            RuntimeWarning,
            stacklevel=2,
        )
    return SinkhornResult(plan, transport_cost(plan, cost), n_iter, err)
