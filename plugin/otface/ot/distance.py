"""OT distances between point clouds: Sinkhorn divergence, entropic OT, transport cost.

For distributions ``alpha``, ``beta`` over point clouds (uniform, or with given per-point
weights, zeros allowed: a masked ViT token is a point of weight 0) and the ground cost ``C``
(cosine by default), with ``OT_eps`` the entropic objective of eq. (1) in
:mod:`otface.ot.sinkhorn` (``<T*, C> + eps * KL(T* | a b^T)``):

* ``"divergence"`` — the Sinkhorn divergence (Feydy et al., AISTATS 2019, eq. 4)
  ``S_eps(alpha, beta) = OT_eps(alpha, beta) - OT_eps(alpha, alpha) / 2 - OT_eps(beta, beta) / 2``:
  zero for identical inputs, symmetric, and non-negative (to solver accuracy) for the cosine
  cost, whose Gibbs kernel ``exp(<x, y> / eps)`` is positive definite; exact envelope gradient
  (each ``OT_eps`` term has gradient ``T*`` w.r.t. its cost);
* ``"entropic"`` — ``OT_eps(alpha, beta)``: exact envelope gradient, one problem per pair;
* ``"transport"`` — ``W = <T*, C>`` with the same gradient ``T*``, which is **not** ``dW/dC``
  (the term ``<dT*/dC, C>`` is dropped; 29-37% relative error measured against ``dW/dx`` at
  eps 0.05-0.1 in issue 10): an approximation, kept for comparison.

Gradient policy: the plans are computed without autograd; each value is ``<T*, C>`` plus a
detached remainder, so the gradient flows into the points through ``C`` only.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from otface.ot.cost import cosine_cost
from otface.ot.marginals import marginals, problem_marginal_errors
from otface.ot.objective import entropic_objective
from otface.ot.solve import solve_ot

__all__ = ["DISTANCES", "OTDistances", "ot_distances"]

DISTANCES = ("divergence", "entropic", "transport")
SELF_TERMS = ("used", "all")


class OTDistances(NamedTuple):
    """Distances for a list of pairs of point clouds, from one batched solve.

    Attributes:
        value: ``(P,)`` distances, differentiable w.r.t. the points (envelope rule).
        n_iter: Sinkhorn iterations of the solve (a 0-d device tensor from the fused kernel).
        marginal_error: 0-d tensor, largest L1 marginal error over all problems solved
            (self-problems of the divergence included).
        n_problems: number of OT problems solved (pairs, plus distinct self-problems).
        unconverged: 0-d tensor, the fraction of those problems that ran ``max_iter``
            iterations and still have a marginal error of ``tol`` or more (0 when
            ``tol <= 0``).
    """

    value: torch.Tensor
    n_iter: int | torch.Tensor
    marginal_error: torch.Tensor
    n_problems: int
    unconverged: Optional[torch.Tensor] = None


def ot_distances(
    points: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    distance: str = "divergence",
    eps: float,
    max_iter: int,
    tol: float,
    solver: str = "auto",
    cost_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cosine_cost,
    cost_range: Optional[float] = None,
    kernel: str = "auto",
    self_terms: str = "used",
    weights: Optional[torch.Tensor] = None,
    eps_scaling: float = 0.0,
    relaxation: float = 1.0,
    warn: bool = True,
) -> OTDistances:
    """OT distance between ``points[source[k]]`` and ``points[target[k]]`` for every pair ``k``.

    Every point cloud is a uniform distribution, or carries its row of ``weights``. All
    problems go to ONE batched solve: the
    ``P`` cross problems and, for ``"divergence"``, the self-problems: with
    ``self_terms="used"``, one per distinct cloud index in ``source`` and ``target`` (a cloud
    that appears in several pairs, e.g. as an anchor in one and a negative in another, is
    solved against itself once), whose count :func:`torch.unique` reads on the host (one
    device sync on CUDA); with ``self_terms="all"``, one per cloud of the bank, ``N`` in all,
    which needs no host read. The self-problems are flagged symmetric, for the solver's
    averaged updates.

    Args:
        points: ``(N, n, C)`` bank of ``N`` point clouds of ``n`` points each (with grad).
        source: ``(P,)`` int64 indices into ``points``.
        target: ``(P,)`` int64 indices into ``points``.
        distance: ``"divergence"``, ``"entropic"`` or ``"transport"`` (module docstring).
        eps: entropic regularisation.
        max_iter: maximum number of Sinkhorn iterations.
        tol: stopping tolerance on the marginal error.
        solver: ``"auto"``, ``"torch"`` or ``"pot"`` (:func:`otface.ot.solve_ot`); all three
            distances are available with every solver.
        cost_fn: ``(B, n, C), (B, m, C) -> (B, n, m)`` ground cost; cosine by default.
        cost_range: bound on each cost row's range known to the caller (2 for the cosine
            cost), for the solver's kernel choice; None: measured.
        kernel: our solver's kernel (:func:`otface.ot.solve_ot`).
        self_terms: ``"used"`` or ``"all"``: the divergence's self-problems (above).
        weights: optional ``(N, n)`` weights of each cloud's points (non-negative, each row
            summing to one with one positive weight at least); a zero weight leaves its point
            out of every problem of its cloud (no mass, no value, zero gradient). None:
            uniform. Every solver takes them (see :func:`otface.ot.sinkhorn.sinkhorn`).
        eps_scaling: ε-scaling factor of our solver (:func:`otface.ot.sinkhorn.sinkhorn`;
            0: off); POT's solver ignores it.
        relaxation: over-relaxation of our solver (1: off); POT's solver ignores it.
        warn: whether our solver warns when it stops at ``max_iter`` (see ``sinkhorn``).

    Returns:
        :class:`OTDistances`.

    Raises:
        ValueError: an unknown ``distance`` or ``self_terms``, indices that are not two 1-D
            tensors of the same length, or ``weights`` not of shape ``(N, n)``.
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown OT distance {distance!r}; choices: {', '.join(DISTANCES)}")
    if points.dim() != 3:
        raise ValueError(f"ot_distances: points must be (N, n, C), got {tuple(points.shape)}")
    if source.dim() != 1 or source.shape != target.shape:
        raise ValueError(
            f"ot_distances: source and target must be 1-D of equal length, got "
            f"{tuple(source.shape)} and {tuple(target.shape)}"
        )
    if self_terms not in SELF_TERMS:
        raise ValueError(f"unknown self_terms {self_terms!r}; choices: {', '.join(SELF_TERMS)}")
    if weights is not None and tuple(weights.shape) != tuple(points.shape[:2]):
        raise ValueError(
            f"ot_distances: weights must be (N, n) = {tuple(points.shape[:2])} like the points' "
            f"first two dimensions, got {tuple(weights.shape)}"
        )
    n_pairs = source.numel()
    symmetric = None
    if distance == "divergence":
        if self_terms == "all":
            distinct = torch.arange(points.shape[0], device=source.device)
            inverse = torch.cat([source, target])
        else:
            distinct, inverse = torch.unique(torch.cat([source, target]), return_inverse=True)
        x_idx, y_idx = torch.cat([source, distinct]), torch.cat([target, distinct])
        symmetric = torch.arange(x_idx.numel(), device=x_idx.device) >= n_pairs
    else:
        x_idx, y_idx = source, target
    # index_select, not points[idx]: the backward of advanced indexing with repeated indices
    # accumulates in a thread-dependent order on CPU, so runs would not repeat bit for bit.
    cost = cost_fn(points.index_select(0, x_idx), points.index_select(0, y_idx))
    a = b = None
    if weights is not None:
        w = weights.detach()
        a, b = w.index_select(0, x_idx), w.index_select(0, y_idx)
    res = solve_ot(
        cost,
        a=a,
        b=b,
        eps=eps,
        max_iter=max_iter,
        tol=tol,
        solver=solver,
        cost_range=cost_range,
        symmetric=symmetric,
        kernel=kernel,
        eps_scaling=eps_scaling,
        relaxation=relaxation,
        warn=warn,
    )
    if distance == "transport":
        value = res.cost
    else:
        value = entropic_objective(res.plan, cost, eps=eps, potentials=res.potentials, a=a, b=b)
    if distance == "divergence":
        cross, self_ot = value[:n_pairs], value[n_pairs:]
        self_x = self_ot.index_select(0, inverse[:n_pairs])
        self_y = self_ot.index_select(0, inverse[n_pairs:])
        value = cross - 0.5 * self_x - 0.5 * self_y
    errors = res.problem_errors
    if errors is None:
        batch, n, m = res.plan.shape
        errors = problem_marginal_errors(
            res.plan,
            marginals(a, n, batch, res.plan, "a"),
            marginals(b, m, batch, res.plan, "b"),
        )
    # Not converged: stopped by max_iter with the error still at or above tol (a NaN error
    # counts). Our solver reports the error its stop test compared with tol, so this agrees
    # with its stop decisions exactly; POT's errors are recomputed from its plans above.
    above = ~(errors < tol)
    if res.problem_iters is not None:
        above &= res.problem_iters.to(errors.device) >= max_iter
    unconverged = above.float().mean() if tol > 0 else errors.new_zeros(())
    return OTDistances(
        value, res.n_iter, res.marginal_error, int(x_idx.numel()), unconverged.detach()
    )
