"""The fused Sinkhorn solve: a Triton kernel that does all iterations of a problem in one launch.

The torch path of :func:`otface.ot.sinkhorn.sinkhorn` runs one batched reduction per half
iteration and reads one number on the host per convergence check. This kernel runs the same
iteration (eq. (1) of :mod:`otface.ot.sinkhorn`, log-domain, float32, averaged updates for
the problems flagged symmetric) with one program per problem, and each problem stops on its
own when its marginal error falls below ``tol`` (checked every ``check_every`` iterations and
at ``max_iter``, as the torch path does for the whole batch).
Nothing is read on the host: the iteration counts and errors come back as device tensors, and
a solve can be captured in a CUDA graph.

Because each problem stops on its own, a problem of a batch gets exactly the plan, potentials
and iteration count that the torch path gives it (which also stops each problem on its own,
reading the errors on the host at each check), to float32 rounding.

Two kernels, chosen by size (:mod:`otface.ot._triton_sinkhorn_kernel`):

* ``n, m <= SMALL_MAX_SIZE`` (64): the register kernel. The problem's ``K = -C / eps`` (padded
  to a power of two, masked) and its potentials stay in registers for all iterations.
* up to ``MAX_SIZE`` (256): the tiled kernel. ``K`` is streamed from global memory in
  ``TILE x TILE`` tiles each half iteration, with an online (running max, rescaled sum)
  log-sum-exp; the potentials live in global memory. It covers the 144 x 144 problems of a
  ViT's 12 x 12 patch tokens, and ragged or zero-weight (masked) support points as the torch
  path does. The register kernel cannot go there: compiled offline for sm_90 (ptxas 13.4 of
  the Triton 3.9 wheel), its 128 x 128 case is capped at 64 registers a thread by its 32 warps
  and spills (a 720-byte stack frame a thread); 256 x 256 would be 256 KiB of registers.

Selection (see :func:`otface.ot.sinkhorn.sinkhorn`): ``kernel="triton"`` explicitly, on CUDA
tensors or on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests),
for ``n, m <= MAX_SIZE``; ``kernel="auto"`` picks it for float32 solves on CUDA when
:mod:`triton` is installed and ``n, m <= AUTO_MAX_SIZE`` (64).

Why "auto" stops at 64, below the tiled kernel's range: the tiled kernel has never run on a
GPU (it is UNMEASURED). Its results equal the torch path's under the interpreter, and it
compiles for sm_90 without spills, but neither its speed against the torch kernels (which at
144 x 144 run batched reductions over an HBM-resident ``(B, n, m)`` block, with a host sync
per check) nor the correctness of its barrier-ordered global scratch on real hardware has been
seen (the interpreter runs a program's threads as one, so it cannot show a missing barrier).
The expectation to check: a 144 x 144 float32 cost is 81 KiB a problem, read twice an
iteration, so some 600 problems' costs fit the 50 MB L2 of an H100/H200 and the kernel should
be bound by its ``exp`` throughput rather than by HBM, with ~1.2x the ``exp`` work of an
unpadded solve (144 is 4.5 tiles of 32). Until a GPU run at that size (which
``benchmarks/bench_ot.py`` does not time yet) confirms both, ViT-size problems take the torch
kernels under "auto" and the tiled kernel with ``kernel="triton"``.

Nothing here imports :mod:`triton` at module level; the kernel module is imported on first use.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple, Optional

import torch

__all__ = [
    "AUTO_MAX_SIZE",
    "MAX_SIZE",
    "SMALL_MAX_SIZE",
    "TritonSolve",
    "auto_fits",
    "available",
    "sinkhorn_triton",
]

AUTO_MAX_SIZE = 64
"""Largest ``n`` and ``m`` for which ``kernel="auto"`` picks the Triton kernel on CUDA (a
64 x 64 float32 problem is 16 KiB of registers per program). Not yet measured on a GPU; see
the module docstring for why it does not yet cover the tiled kernel's sizes."""

SMALL_MAX_SIZE = 64
"""Largest ``n`` and ``m`` solved by the register kernel; larger ones by the tiled kernel."""

MAX_SIZE = 256
"""Largest ``n`` and ``m`` the kernels accept when asked for explicitly (the tiled kernel has
no register bound; 256 is as far as it is tested)."""

_TILE = 32
_TILED_WARPS = 8


class TritonSolve(NamedTuple):
    """Raw output of one kernel launch (all on the cost's device, no autograd).

    Attributes:
        plan: ``(B, n, m)`` float32 plans.
        u: ``(B, n)`` and ``v``: ``(B, m)`` log-scalings, ``plan = exp(u_i + v_j - C_ij/eps)``.
        iters: ``(B,)`` int32 iterations each problem ran.
        errors: ``(B,)`` L1 marginal error of each plan (the larger of rows and columns), the
            one the stop test measured at the problem's last iteration.
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
    # 3.9 wheel), 64 x 64 took 178 registers a thread with 8 warps and none spilled, 255 and
    # a spill with 4; 16 x 16 with one warp 109. Rechecked with that wheel's ptxas 13.4 (the
    # one Triton runs for sm_90) at 8 warps: 225 registers without symmetric problems, 255 and
    # an 8-byte spill with them. Not yet timed on a GPU.
    return max(1, min(32, block_n * block_m // 512))


def _launch_tiled(cost, a, b, sym, plan, u, v, iters, errors, args, has_sym):
    # 32 x 32 tiles, 4 elements a thread with 8 warps; 144 = 4.5 tiles, so 11% of padding a
    # dimension. Compiled offline for sm_90 (ptxas 13.4 of the Triton 3.9 wheel): 64 registers
    # a thread, no spills (with 4 warps ptxas picked 96 registers and spilled; tests check for
    # spills). Neither the tile nor the warps are tuned on a GPU.
    from otface.ot._triton_sinkhorn_kernel import sinkhorn_tiled_kernel

    lse = torch.empty_like(u)  # scratch: the row log-sum-exp of each iteration
    sinkhorn_tiled_kernel[(cost.shape[0],)](
        cost,
        a,
        b,
        sym,
        plan,
        u,
        v,
        lse,
        iters,
        errors,
        *args,
        TILE_N=_TILE,
        TILE_M=_TILE,
        HAS_SYM=has_sym,
        num_warps=_TILED_WARPS,
    )


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
    e0 = eps if eps_start is None else eps_start
    args = (
        n,
        m,
        -1.0 / eps,
        (float(e0), int(n_stages), float(eps_scaling), float(eps)),  # the annealing schedule
        (float(tol), int(max_iter), int(check_every)),  # the stop rule
        float(relaxation),
    )
    if max(n, m) > SMALL_MAX_SIZE:
        _launch_tiled(cost, a, b, sym, plan, u, v, iters, errors, args, has_sym)
        return TritonSolve(plan, u, v, iters, errors)
    from otface.ot._triton_sinkhorn_kernel import sinkhorn_kernel

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
        *args,
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        HAS_SYM=has_sym,
        num_warps=_num_warps(block_n, block_m),
    )
    return TritonSolve(plan, u, v, iters, errors)
