"""The fused Sinkhorn solve: a Triton kernel that does all iterations of a problem on chip.

The torch path of :func:`otface.ot.sinkhorn.sinkhorn` runs one batched reduction per half
iteration and reads one number on the host per convergence check. This kernel runs the same
iteration (eq. (1) of :mod:`otface.ot.sinkhorn`, log-domain, float32, averaged updates for
the problems flagged symmetric) with one program per problem: the problem's ``K = -C / eps``
(padded to a power of two, masked) and its potentials stay in registers for all iterations,
and each problem stops on its own when its marginal error falls below ``tol`` (checked every
``check_every`` iterations and at ``max_iter``, as the torch path does for the whole batch).
Nothing is read on the host: the iteration counts and errors come back as device tensors, and
a solve can be captured in a CUDA graph.

Because each problem stops on its own, a problem of a batch gets exactly the plan, potentials
and iteration count that the torch path gives it (which also stops each problem on its own,
reading the errors on the host at each check), to float32 rounding.

Selection (see :func:`otface.ot.sinkhorn.sinkhorn`): ``kernel="triton"`` explicitly, on CUDA
tensors or on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests);
``kernel="auto"`` picks it for float32 solves on CUDA when :mod:`triton` is installed and
``n, m <= AUTO_MAX_SIZE``.

Nothing here imports :mod:`triton` at module level; the kernel module is imported on first use.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple, Optional

import torch

__all__ = ["AUTO_MAX_SIZE", "MAX_SIZE", "TritonSolve", "auto_fits", "available", "sinkhorn_triton"]

AUTO_MAX_SIZE = 64
"""Largest ``n`` and ``m`` for which ``kernel="auto"`` picks the Triton kernel on CUDA (a
64 x 64 float32 problem is 16 KiB of registers per program). Not yet measured on a GPU."""

MAX_SIZE = 128
"""Largest ``n`` and ``m`` the kernel accepts when asked for explicitly."""


class TritonSolve(NamedTuple):
    """Raw output of one kernel launch (all on the cost's device, no autograd).

    Attributes:
        plan: ``(B, n, m)`` float32 plans.
        u: ``(B, n)`` and ``v``: ``(B, m)`` log-scalings, ``plan = exp(u_i + v_j - C_ij/eps)``.
        iters: ``(B,)`` int32 iterations each problem ran.
        errors: ``(B,)`` L1 marginal error of each plan (the larger of rows and columns).
    """

    plan: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    iters: torch.Tensor
    errors: torch.Tensor


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether :mod:`triton` is installed (found without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def auto_fits(cost: torch.Tensor) -> bool:
    """Whether ``kernel="auto"`` should use this kernel for ``cost`` (no device read)."""
    _, n, m = cost.shape
    return (
        cost.is_cuda
        and torch.promote_types(cost.dtype, torch.float32) == torch.float32
        and max(n, m) <= AUTO_MAX_SIZE
        and available()
    )


def _num_warps(block_n: int, block_m: int) -> int:
    # At most 16 elements of K per thread. Compiled offline for sm_90 (ptxas of the Triton
    # 3.9 wheel), 64 x 64 takes 178 registers a thread with 8 warps and none spilled, 255 and
    # a spill with 4; 16 x 16 with one warp 109. Not yet timed on a GPU.
    return max(1, min(32, block_n * block_m // 512))


def sinkhorn_triton(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    eps: float,
    max_iter: int,
    tol: float,
    check_every: int,
    symmetric: Optional[torch.Tensor] = None,
    eps_start: Optional[float] = None,
    n_stages: int = 0,
    eps_scaling: float = 0.0,
    relaxation: float = 1.0,
) -> TritonSolve:
    """Run the fused kernel on a batch (inputs already checked by ``sinkhorn``).

    Args:
        cost: ``(B, n, m)`` costs, ``B >= 1``, any float dtype of at most 32 bits (read and
            converted to float32 in the kernel).
        a: ``(B, n)`` and ``b``: ``(B, m)`` float32 marginals.
        eps, max_iter, tol, check_every: as in :func:`otface.ot.sinkhorn.sinkhorn`.
        symmetric: optional ``(B,)`` bool mask (``n == m``), averaged updates.
        eps_start, n_stages, eps_scaling: the eps-scaling iterations that come first (eps
            ``eps_start * eps_scaling^k`` for ``k < n_stages``; see
            :func:`otface.ot.sinkhorn.eps_stages`); ``n_stages = 0``: none.
        relaxation: over-relaxation of the non-symmetric problems (1: plain), as in
            :func:`otface.ot.sinkhorn.sinkhorn`.

    Returns:
        :class:`TritonSolve`.

    Raises:
        ValueError: a float64 cost, ``n`` or ``m`` above :data:`MAX_SIZE`, Triton missing, or
            a CPU tensor without ``TRITON_INTERPRET=1``.
    """
    batch, n, m = cost.shape
    if not available():
        raise ValueError("sinkhorn: kernel='triton' needs the triton package (pip install triton)")
    if not cost.is_cuda and not _interpreted():
        raise ValueError(
            f"sinkhorn: kernel='triton' runs on CUDA tensors, or on CPU tensors under "
            f"TRITON_INTERPRET=1; got a {cost.device.type} tensor"
        )
    if torch.promote_types(cost.dtype, torch.float32) != torch.float32:
        raise ValueError(f"sinkhorn: kernel='triton' solves in float32, got a {cost.dtype} cost")
    if max(n, m) > MAX_SIZE:
        raise ValueError(
            f"sinkhorn: kernel='triton' takes n, m <= {MAX_SIZE}, got {n} x {m}; use 'auto'"
        )
    from otface.ot._triton_sinkhorn_kernel import sinkhorn_kernel

    cost = cost.detach().contiguous()
    a = a.detach().to(torch.float32).contiguous()
    b = b.detach().to(torch.float32).contiguous()
    dev = cost.device
    plan = torch.empty((batch, n, m), dtype=torch.float32, device=dev)
    u = torch.empty((batch, n), dtype=torch.float32, device=dev)
    v = torch.empty((batch, m), dtype=torch.float32, device=dev)
    iters = torch.empty((batch,), dtype=torch.int32, device=dev)
    errors = torch.empty((batch,), dtype=torch.float32, device=dev)
    has_sym = symmetric is not None
    # Without symmetric problems the kernel never reads sym_ptr (HAS_SYM is a constexpr).
    sym = symmetric.reshape(batch).to(torch.int8).contiguous() if has_sym else iters
    block_n = max(16, 1 << (n - 1).bit_length())
    block_m = max(16, 1 << (m - 1).bit_length())
    if has_sym:
        block_n = block_m = max(block_n, block_m)
    sinkhorn_kernel[(batch,)](
        cost,
        a,
        b,
        sym,
        plan,
        u,
        v,
        iters,
        errors,
        n,
        m,
        -1.0 / eps,
        float(tol),
        int(max_iter),
        int(check_every),
        float(eps if eps_start is None else eps_start),
        int(n_stages),
        float(eps_scaling),
        float(eps),
        float(relaxation),
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        HAS_SYM=has_sym,
        num_warps=_num_warps(block_n, block_m),
    )
    return TritonSolve(plan, u, v, iters, errors)
