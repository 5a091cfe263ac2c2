"""The same entropic OT problems handed to POT's batched solver (``ot.solve_batch``).

POT (Python Optimal Transport, >= 0.9.6) is optional; it is imported only when this backend is
used. Its log-domain Sinkhorn checks convergence every 10 iterations on the L2 norm of the row
marginal error; we report our own L1 marginal error of the plan it returns. Its log-scalings
``(u, v)`` use our convention (``plan = exp(u_i + v_j - C_ij / eps)``) and are returned, so
:func:`otface.ot.objective.entropic_objective` gives ``OT_eps`` for POT's plans exactly as for
ours.
"""

from __future__ import annotations

from typing import Optional

import torch

from otface.ot.marginals import marginal_error, marginals
from otface.ot.objective import transport_cost
from otface.ot.sinkhorn import SinkhornResult

__all__ = ["pot_sinkhorn"]


def pot_sinkhorn(
    cost: torch.Tensor,
    *,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    eps: float,
    max_iter: int,
    tol: float,
) -> SinkhornResult:
    """Solve ``(B, n, m)`` entropic OT problems with POT's ``ot.solve_batch`` (log Sinkhorn).

    Uniform marginals unless ``a``, ``b`` are given (zero weights allowed: POT gives their
    points potential ``-inf`` and no mass, as ours does); the plan is computed without autograd
    and ``result.cost`` is ``<plan, C>`` differentiable w.r.t. ``C`` (envelope rule), as in
    :func:`otface.ot.sinkhorn.sinkhorn`. An empty batch gives an empty result connected to the
    graph of ``cost`` without calling POT (whose solver fails on it).

    Args:
        cost: ``(B, n, m)`` cost matrices (any float dtype; solved in float32 or float64).
        a: ``(B, n)`` or ``(n,)`` source weights; uniform if None.
        b: ``(B, m)`` or ``(m,)`` target weights; uniform if None.
        eps: entropic regularisation (POT's ``reg``).
        max_iter: maximum number of iterations.
        tol: POT's tolerance.

    Returns:
        :class:`otface.ot.sinkhorn.SinkhornResult`, with POT's potentials.

    Raises:
        ValueError: a cost that is not 3-D, or ``n = 0`` or ``m = 0``.
        ImportError: POT missing or older than 0.9.6.
    """
    if cost.dim() != 3:
        raise ValueError(f"pot_sinkhorn: cost must be (B, n, m), got shape {tuple(cost.shape)}")
    batch, n, m = cost.shape
    if n == 0 or m == 0:
        raise ValueError(
            f"pot_sinkhorn: distributions with no points (n = {n}, m = {m}); each needs at "
            "least one"
        )
    dtype = torch.promote_types(cost.dtype, torch.float32)
    if batch == 0:
        plan = cost.new_zeros((0, n, m), dtype=dtype)
        potentials = (plan.new_zeros((0, n)), plan.new_zeros((0, m)))
        return SinkhornResult(plan, transport_cost(plan, cost), 0, plan.new_zeros(()), potentials)
    try:
        import ot
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("solver='pot' needs POT: pip install pot") from err
    if not hasattr(ot, "solve_batch"):  # pragma: no cover - depends on the environment
        raise ImportError(
            f"solver='pot' needs POT >= 0.9.6 (ot.solve_batch), found {ot.__version__}"
        )
    with torch.no_grad(), torch.autocast(device_type=cost.device.type, enabled=False):
        c = cost.detach().to(dtype)
        a_ = marginals(a, n, batch, c, "a")
        b_ = marginals(b, m, batch, c, "b")
        weights = {} if a is None and b is None else dict(a=a_, b=b_)
        res = ot.solve_batch(
            c,
            reg=eps,
            max_iter=max_iter,
            tol=tol,
            method="log_sinkhorn",
            grad="detach",
            **weights,
        )
        plan = res.plan
        err = marginal_error(plan, a_, b_)
        potentials = tuple(p.detach() for p in res.potentials)
    # POT's loop counter starts at 0 and stops right after a check, so it ran n_iters + 1.
    n_iter = int(res.log["n_iter"]) + 1
    return SinkhornResult(plan, transport_cost(plan, cost), n_iter, err, potentials)
