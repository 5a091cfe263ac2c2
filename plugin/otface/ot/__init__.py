"""Optimal transport for OTFace: cosine cost, batched log-domain Sinkhorn, solver front,
distances (Sinkhorn divergence, entropic OT, transport cost)."""

from otface.ot.cost import cosine_cost
from otface.ot.distance import DISTANCES, OTDistances, ot_distances
from otface.ot.marginals import marginal_error
from otface.ot.objective import entropic_objective, transport_cost
from otface.ot.sinkhorn import SinkhornResult, sinkhorn
from otface.ot.solve import SOLVERS, solve_ot

__all__ = [
    "DISTANCES",
    "OTDistances",
    "SOLVERS",
    "SinkhornResult",
    "cosine_cost",
    "entropic_objective",
    "marginal_error",
    "ot_distances",
    "sinkhorn",
    "solve_ot",
    "transport_cost",
]
