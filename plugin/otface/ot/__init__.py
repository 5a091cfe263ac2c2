"""Optimal transport for OTFace: cosine cost, batched log-domain Sinkhorn, solver front."""

from otface.ot.cost import cosine_cost
from otface.ot.sinkhorn import SinkhornResult, entropic_objective, sinkhorn, transport_cost
from otface.ot.solve import SOLVERS, solve_ot

__all__ = [
    "SOLVERS",
    "SinkhornResult",
    "cosine_cost",
    "entropic_objective",
    "sinkhorn",
    "solve_ot",
    "transport_cost",
]
