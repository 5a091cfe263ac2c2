"""Values of entropic OT plans, with envelope gradients: the transport cost ``<T, C>`` and the
entropic objective ``OT_eps`` of eq. (1) in :mod:`otface.ot.sinkhorn`,

    OT_eps(C) = min_{T >= 0, T 1 = a, T^T 1 = b}  <T, C> + eps * KL(T | a b^T).          (1)

Gradients follow the envelope theorem: ``dOT_eps/dC = T*`` exactly at the fixed point (the
regulariser does not depend on ``C`` and the constraint set is fixed). The plan is computed
without autograd and held constant; values are written as ``<T*, C>`` plus detached terms, so
autograd returns ``T*`` through ``C`` only:

* :func:`transport_cost` (``SinkhornResult.cost``) is the transport cost of the entropic plan,
  ``W = <T*, C>``. Its gradient is also taken to be ``T*``, which is **not** ``dW/dC`` (the
  term ``<dT*/dC, C>`` is missing): an approximation, kept for comparison
  (``otface.distance = "transport"``);
* :func:`entropic_objective` is ``OT_eps`` of (1), whose exact gradient ``T*`` is.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from otface.ot.marginals import marginals

__all__ = ["entropic_objective", "transport_cost"]


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
    """``OT_eps(C) = <T*, C> + eps * KL(T* | a b^T)`` (eq. (1)), envelope gradient.

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
