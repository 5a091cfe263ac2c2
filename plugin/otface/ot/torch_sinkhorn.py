"""The torch path of :func:`otface.ot.sinkhorn.sinkhorn`: the batched log-domain iteration on
a softmin kernel of :mod:`otface.ot.softmin` (``"torch"`` or ``"matmul"``), as against the
fused Triton kernel of :mod:`otface.ot.triton_sinkhorn`.

One Sinkhorn iteration updates both potentials, ``u = log a - LSE_j(-C/eps + v)`` then
``v = log b - LSE_i(-C/eps + u)``, over-relaxed and safeguarded, or averaged on the problems
flagged symmetric. Each problem stops on its own: at a check the problems whose marginal error
is below ``tol`` (or not finite) leave the batch, and the others iterate on, so a problem gets
the plan it gets when solved alone. Each check reads the errors on the host (a device sync on
CUDA).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from otface.ot.softmin import KERNELS, matmul_max_range

__all__ = ["TorchSolve", "sinkhorn_torch"]


class TorchSolve(NamedTuple):
    """Raw output of a torch-path solve (no autograd), on the cost's device.

    Attributes:
        plan: ``(B, n, m)`` plans in the solve's dtype.
        u: ``(B, n)`` and ``v``: ``(B, m)`` log-scalings, ``plan = exp(u_i + v_j - C_ij/eps)``.
        n_iter: the most iterations any problem ran (read on the host already).
        iters: ``(B,)`` int32 iterations each problem ran.
        errors: ``(B,)`` L1 marginal error of each plan, the one its stop test measured.
        converged: whether every problem stopped on ``tol`` (or on a non-finite error).
    """

    plan: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    n_iter: int
    iters: torch.Tensor
    errors: torch.Tensor
    converged: bool


def sinkhorn_torch(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    eps: float,
    stages: list,
    kernel: str,
    cost_range: Optional[float],
    symmetric: Optional[torch.Tensor],
    relaxation: float,
    max_iter: int,
    tol: float,
    check_every: int,
) -> TorchSolve:
    """Solve a batch (inputs already checked by ``sinkhorn``) in the dtype of ``a``.

    Args (the problem, its eps schedule, the kernel, the updates, the stop rule):
        cost: ``(B, n, m)`` costs, ``B >= 1``.
        a: ``(B, n)`` and ``b``: ``(B, m)`` weights in the solve's dtype (float32 or float64).
        eps: the entropic regularisation.
        stages: the eps of the annealing iterations that come first
            (:func:`otface.ot.sinkhorn.eps_stages`); empty: none.
        kernel, cost_range: the softmin kernel, ``"auto"``, ``"torch"`` or ``"matmul"``, and
            the known cost range that lets ``"auto"`` choose without measuring.
        symmetric: optional ``(B, 1)`` bool mask of symmetric problems (averaged updates).
        relaxation: over-relaxation of the other problems (1: plain), safeguarded.
        max_iter, tol, check_every: the stop rule, as in :func:`otface.ot.sinkhorn.sinkhorn`.

    Returns:
        :class:`TorchSolve`.
    """
    batch = cost.shape[0]
    dtype = a.dtype
    with torch.no_grad(), torch.autocast(device_type=cost.device.type, enabled=False):
        c = cost.detach().to(dtype)
        log_a, log_b = torch.log(a), torch.log(b)
        u = torch.zeros_like(a)
        v = torch.zeros_like(b)
        for k, stage_eps in enumerate(stages):
            # One iteration at a larger eps, then the potentials carried to the next eps: the
            # dual potentials f = eps (u - log a), g = eps (v - log b) are kept fixed.
            stage_logk = c * (-1.0 / stage_eps)
            pick = _pick_kernel(kernel, stage_logk, eps=stage_eps, cost_range=cost_range)
            stage = KERNELS[pick](stage_logk)
            u, v, _ = _iterate(stage, stage.row(v), u, v, log_a, log_b, symmetric, None)
            ratio = stage_eps / (stages[k + 1] if k + 1 < len(stages) else eps)
            u = torch.where(a > 0, log_a + (u - log_a) * ratio, u)
            v = torch.where(b > 0, log_b + (v - log_b) * ratio, v)
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
            a,
            b,
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
    return TorchSolve(plan, u, v, int(iters_all.max()), iters_all.to(c.device), errors, converged)


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
