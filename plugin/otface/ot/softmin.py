"""The inner log-sum-exp ("softmin") of log-domain Sinkhorn, behind one pluggable seam.

Sinkhorn in the log domain alternates the two reductions

    row(v)[b, i] = log sum_j exp(K[b, i, j] + v[b, j])
    col(u)[b, j] = log sum_i exp(K[b, i, j] + u[b, i])

with ``K = -C / eps``. A *kernel* prepares whatever it needs from ``K`` once per solve and then
evaluates these reductions. Every kernel returns the same numbers up to rounding; they differ
only in speed and in the range of ``K`` they handle exactly:

* ``"torch"`` — the reference: :func:`torch.logsumexp` on ``K + v`` each time. Exact for any
  ``K``; one ``exp`` of the whole ``(B, n, m)`` block per reduction.
* ``"matmul"`` — exponentiates ``K`` once, shifted by its row maxima ``r``
  (``E = exp(K - r) in (0, 1]``), keeps the potentials in the log domain, and evaluates each
  reduction as a batched vector-matrix product with a max-shifted ``exp`` of the potential:
  ``row(v) = r + max(v) + log(E exp(v - max v))``. Each sum contains a term
  ``>= exp(-R)`` where ``R`` is the largest row range of ``K``; when ``R <= max_range`` (60 in
  float32, 600 in float64) nothing that matters underflows and the result equals the reference
  to rounding. For the cosine cost (range <= 2) this holds for ``eps >= 2/60``.

The fused GPU solver does not fit this seam: it runs the whole iteration per problem on chip,
so it sits behind :func:`otface.ot.sinkhorn.sinkhorn` as ``kernel="triton"`` instead
(:mod:`otface.ot.triton_sinkhorn`).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

__all__ = ["KERNELS", "LogKernel", "TorchLogKernel", "MatmulLogKernel", "matmul_max_range"]


def matmul_max_range(dtype: torch.dtype) -> float:
    """Largest row range of ``K`` that the ``"matmul"`` kernel handles to full precision."""
    return 600.0 if dtype == torch.float64 else 60.0


class LogKernel:
    """Interface of a softmin kernel: built from ``K`` (``(B, n, m)``), then queried."""

    def row(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """``(B, m)`` potential → ``(B, n)`` row log-sum-exp."""
        raise NotImplementedError

    def col(self, u: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """``(B, n)`` potential → ``(B, m)`` column log-sum-exp."""
        raise NotImplementedError


class TorchLogKernel(LogKernel):
    """Reference kernel: :func:`torch.logsumexp` over ``K + potential``."""

    def __init__(self, logk: torch.Tensor) -> None:
        self.logk = logk
        self._buf = torch.empty_like(logk)  # reused: avoids a fresh (B, n, m) block per call

    def row(self, v: torch.Tensor) -> torch.Tensor:
        torch.add(self.logk, v.unsqueeze(-2), out=self._buf)
        return torch.logsumexp(self._buf, dim=-1)

    def col(self, u: torch.Tensor) -> torch.Tensor:
        torch.add(self.logk, u.unsqueeze(-1), out=self._buf)
        return torch.logsumexp(self._buf, dim=-2)


class MatmulLogKernel(LogKernel):
    """Kernel exponentiating ``K`` once; each reduction is a batched vector-matrix product."""

    def __init__(self, logk: torch.Tensor) -> None:
        self.shift = logk.amax(dim=-1)  # (B, n) row maxima r
        e = torch.exp(logk - self.shift.unsqueeze(-1))
        self.e = e  # (B, n, m), used as w @ E for the column reduction
        # A row vector times a contiguous matrix is the fast batched product on every backend;
        # storing E^T contiguously lets the row reduction use the same form.
        self.e_t = e.transpose(-1, -2).contiguous()

    @staticmethod
    def _vecmat(w: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        return torch.bmm(w.unsqueeze(-2), mat).squeeze(-2)

    def row(self, v: torch.Tensor) -> torch.Tensor:
        vmax = v.amax(dim=-1, keepdim=True)
        s = self._vecmat(torch.exp(v - vmax), self.e_t)
        return self.shift + vmax + torch.log(s)

    def col(self, u: torch.Tensor) -> torch.Tensor:
        z = u + self.shift
        zmax = z.amax(dim=-1, keepdim=True)
        s = self._vecmat(torch.exp(z - zmax), self.e)
        return zmax + torch.log(s)


KERNELS: Dict[str, Callable[[torch.Tensor], LogKernel]] = {
    "torch": TorchLogKernel,
    "matmul": MatmulLogKernel,
}
