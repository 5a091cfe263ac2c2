"""The same entropic OT problems handed to POT's batched solver (``ot.solve_batch``).

POT (Python Optimal Transport, >= 0.9.6) is optional; it is imported only when this backend is
used. Its log-domain Sinkhorn checks convergence every 10 iterations on the L2 norm of the row
marginal error; we report our own L1 marginal error of the plan it returns.
"""

from __future__ import annotations

import torch

from otface.ot.sinkhorn import SinkhornResult, transport_cost

__all__ = ["pot_sinkhorn"]


def pot_sinkhorn(cost: torch.Tensor, *, eps: float, max_iter: int, tol: float) -> SinkhornResult:
    """Solve ``(B, n, m)`` entropic OT problems with POT's ``ot.solve_batch`` (log Sinkhorn).

    Uniform marginals; the plan is computed without autograd and ``result.cost`` is
    ``<plan, C>`` differentiable w.r.t. ``C`` (envelope rule), as in
    :func:`otface.ot.sinkhorn.sinkhorn`.

    Args:
        cost: ``(B, n, m)`` cost matrices (any float dtype; solved in float32 or float64).
        eps: entropic regularisation (POT's ``reg``).
        max_iter: maximum number of iterations.
        tol: POT's tolerance.

    Returns:
        :class:`otface.ot.sinkhorn.SinkhornResult`.
    """
    try:
        import ot
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("solver='pot' needs POT: pip install pot") from err
    if not hasattr(ot, "solve_batch"):  # pragma: no cover - depends on the environment
        raise ImportError(
            f"solver='pot' needs POT >= 0.9.6 (ot.solve_batch), found {ot.__version__}"
        )
    if cost.dim() != 3:
        raise ValueError(f"pot_sinkhorn: cost must be (B, n, m), got shape {tuple(cost.shape)}")
    dtype = torch.promote_types(cost.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(device_type=cost.device.type, enabled=False):
        c = cost.detach().to(dtype)
        res = ot.solve_batch(
            c, reg=eps, max_iter=max_iter, tol=tol, method="log_sinkhorn", grad="detach"
        )
        plan = res.plan
        _, n, m = c.shape
        err = torch.maximum(
            (plan.sum(dim=-1) - 1.0 / n).abs().sum(dim=-1).amax(),
            (plan.sum(dim=-2) - 1.0 / m).abs().sum(dim=-1).amax(),
        )
    # POT's loop counter starts at 0 and stops right after a check, so it ran n_iters + 1.
    n_iter = int(res.log["n_iter"]) + 1
    return SinkhornResult(plan, transport_cost(plan, cost), n_iter, err)
