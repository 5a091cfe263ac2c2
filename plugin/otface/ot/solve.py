"""One front for the entropic OT solvers: ours (``"torch"``) or POT's (``"pot"``)."""

from __future__ import annotations

from typing import Optional

import torch

from otface.ot.sinkhorn import SinkhornResult, sinkhorn

__all__ = ["SOLVERS", "solve_ot"]

SOLVERS = ("auto", "torch", "pot")


def solve_ot(
    cost: torch.Tensor,
    *,
    eps: float,
    max_iter: int,
    tol: float,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    solver: str = "auto",
    cost_range: Optional[float] = None,
    symmetric: Optional[torch.Tensor] = None,
    kernel: str = "auto",
    eps_scaling: float = 0.0,
    relaxation: float = 1.0,
    warn: bool = True,
) -> SinkhornResult:
    """Solve ``(B, n, m)`` entropic OT problems, with uniform marginals unless given.

    Args:
        cost: ``(B, n, m)`` cost matrices.
        a: ``(B, n)`` or ``(n,)`` source weights (non-negative, summing to one; a zero weight
            takes a point out of the distribution); uniform if None.
        b: ``(B, m)`` or ``(m,)`` target weights; uniform if None.
        eps: entropic regularisation.
        max_iter: maximum number of Sinkhorn iterations.
        tol: stopping tolerance on the marginal error.
        solver: ``"torch"`` (:func:`otface.ot.sinkhorn.sinkhorn`), ``"pot"``
            (``ot.solve_batch``) or ``"auto"``, which picks ``"torch"``: it measured faster
            than POT on every size in ``benchmarks/bench_ot.py``.
        cost_range: known bound on each cost row's range (see
            :func:`otface.ot.sinkhorn.sinkhorn`); unused by POT.
        symmetric: optional ``(B,)`` mask of symmetric problems, solved with averaged updates
            by ``"torch"`` (see :func:`otface.ot.sinkhorn.sinkhorn`); POT solves them with its
            plain updates (same fixed point, more iterations).
        kernel: our solver's kernel (:data:`otface.ot.sinkhorn.KERNEL_CHOICES`: ``"auto"``,
            ``"torch"``, ``"matmul"``, ``"triton"``); ignored by POT.
        eps_scaling: ε-scaling factor of our solver (0: off); ignored by POT.
        relaxation: over-relaxation of our solver (1: off); ignored by POT.
        warn: our solver warns once when it stops at ``max_iter`` above ``tol``.

    Returns:
        :class:`otface.ot.sinkhorn.SinkhornResult`.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown OT solver {solver!r}; choices: {', '.join(SOLVERS)}")
    if solver == "pot":
        from otface.ot.pot_backend import pot_sinkhorn

        return pot_sinkhorn(cost, a=a, b=b, eps=eps, max_iter=max_iter, tol=tol)
    return sinkhorn(
        cost,
        a=a,
        b=b,
        eps=eps,
        max_iter=max_iter,
        tol=tol,
        cost_range=cost_range,
        symmetric=symmetric,
        kernel=kernel,
        eps_scaling=eps_scaling,
        relaxation=relaxation,
        warn=warn,
    )
