"""Triton whole-solve Sinkhorn kernel: one program per problem, everything on chip.

Private: this module imports :mod:`triton` at its top, so it is imported only by
:func:`otface.ot.triton_sinkhorn.sinkhorn_triton` when the kernel is first launched (importing
:mod:`otface` never imports Triton). Whether ``triton.jit`` compiles or interprets is decided
when this module is first imported (``TRITON_INTERPRET=1``: interpreted, on CPU tensors).

The kernel runs the same iteration as the torch path of :func:`otface.ot.sinkhorn.sinkhorn`
(same update order, same averaged updates for symmetric problems, same convergence test),
on one problem per program, with ``K = -C / eps`` and the potentials held in registers for all
iterations. Each program stops on its own: the loop is a device-side ``while`` whose condition
is the problem's own marginal error, checked every ``check_every`` iterations and at
``max_iter``. Nothing is read on the host, so a launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["sinkhorn_kernel"]


@triton.jit
def _lse(x, AXIS: tl.constexpr):
    # log-sum-exp along AXIS; an all -inf slice (padding, or a row whose costs are all +inf)
    # gives -inf like torch.logsumexp, not NaN from (-inf) - (-inf).
    mx = tl.max(x, axis=AXIS)
    safe = tl.where(mx == -float("inf"), 0.0, mx)
    s = tl.sum(tl.exp(x - tl.expand_dims(safe, AXIS)), axis=AXIS)
    return safe + tl.log(s)


@triton.jit
def _step(old, target, other, log_w, mask, omega, sym, HAS_SYM: tl.constexpr):
    # Over-relaxed by omega (a zero weight keeps its -inf potential), averaged when symmetric.
    target = tl.where(mask, target, 0.0)
    new = tl.where(log_w > -float("inf"), old + omega * (target - old), target)
    if HAS_SYM:
        new = tl.where(sym, 0.5 * (other + target), new)
    return new


@triton.jit
def _update(logk, lse_row, u, v, log_a, log_b, rmask, cmask, omega, sym, HAS_SYM: tl.constexpr):
    # One iteration, both potentials, from lse_row = LSE_j(logk + v). Returns the new u, v and
    # LSE_i(logk + u).
    u = _step(u, log_a - lse_row, v, log_a, rmask, omega, sym, HAS_SYM)
    lse_col = _lse(logk + u[:, None], 0)
    v = _step(v, log_b - lse_col, u, log_b, cmask, omega, sym, HAS_SYM)
    return u, v, lse_col


@triton.jit
def sinkhorn_kernel(
    cost_ptr,
    a_ptr,
    b_ptr,
    sym_ptr,
    plan_ptr,
    u_ptr,
    v_ptr,
    iters_ptr,
    err_ptr,
    n,
    m,
    neg_inv_eps,
    tol,
    max_iter,
    check_every,
    eps_start,
    n_stages,
    scaling,
    eps,
    relaxation,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_SYM: tl.constexpr,
):
    """Solve problem ``program_id(0)``. All tensors contiguous.

    Shapes: ``cost`` (float32, float16 or bfloat16, read as float32) and ``plan`` (float32)
    ``(B, n, m)``; ``a``, ``u`` ``(B, n)`` and ``b``, ``v`` ``(B, m)`` float32; ``sym``
    ``(B,)`` int8, read only when ``HAS_SYM`` (then ``n == m`` and ``BLOCK_N == BLOCK_M``);
    ``iters`` ``(B,)`` int32; ``err`` ``(B,)`` float32. ``BLOCK_N >= n`` and
    ``BLOCK_M >= m`` are powers of two; the padding is masked. ``n_stages`` annealing
    iterations (eps ``eps_start * scaling^k``, then ``eps``; ``neg_inv_eps = -1 / eps``) come
    first and count as iterations, as in the torch path. ``relaxation``: the over-relaxation
    of the later iterations (1: plain), safeguarded as in the torch path.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    rmask = rows < n
    cmask = cols < m
    mask = rmask[:, None] & cmask[None, :]
    offs = pid * n * m + rows[:, None] * m + cols[None, :]
    c = tl.load(cost_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    logk = tl.where(mask, c * neg_inv_eps, -float("inf"))
    # Padding reads weight 1 (log 0, no -inf - -inf below); masked wherever it is used.
    a = tl.load(a_ptr + pid * n + rows, mask=rmask, other=1.0)
    b = tl.load(b_ptr + pid * m + cols, mask=cmask, other=1.0)
    log_a = tl.log(a)
    log_b = tl.log(b)
    if HAS_SYM:
        sym = tl.load(sym_ptr + pid) != 0
    else:
        sym = pid < 0  # not read

    # Padded entries keep potential 0 (their K is -inf, so they add nothing to any sum).
    u = tl.zeros([BLOCK_N], dtype=tl.float32)
    v = tl.zeros([BLOCK_M], dtype=tl.float32)
    # eps-scaling: one iteration at each larger eps, the potentials carried in cost units.
    e = eps_start
    stage = 0
    while stage < n_stages:
        stage_logk = tl.where(mask, c * (-1.0 / e), -float("inf"))
        stage_row = _lse(stage_logk + v[None, :], 1)
        u, v, _ = _update(
            stage_logk, stage_row, u, v, log_a, log_b, rmask, cmask, 1.0, sym, HAS_SYM
        )
        e_next = tl.maximum(e * scaling, eps)
        stage += 1
        e_next = tl.where(stage == n_stages, eps, e_next)
        ratio = e / e_next
        u = tl.where(rmask & (a > 0), log_a + (u - log_a) * ratio, u)
        v = tl.where(cmask & (b > 0), log_b + (v - log_b) * ratio, v)
        e = e_next
    lse_row = _lse(logk + v[None, :], 1)
    it = n_stages
    going = max_iter > n_stages
    omega = relaxation
    best_err = float("inf")
    while going:
        u, v, lse_col = _update(
            logk, lse_row, u, v, log_a, log_b, rmask, cmask, omega, sym, HAS_SYM
        )
        lse_row = _lse(logk + v[None, :], 1)
        it += 1
        # The same test as the torch path: L1 row error of the current plan (its columns are
        # exact), both marginals for a symmetric problem; a non-finite error (NaN cost) stops
        # the problem, as the torch path leaves it out of its batch-wide test.
        err = tl.sum(tl.where(rmask, tl.abs(tl.exp(u + lse_row) - a), 0.0), axis=0)
        if HAS_SYM:
            col_err = tl.sum(tl.where(cmask, tl.abs(tl.exp(v + lse_col) - b), 0.0), axis=0)
            both = tl.maximum(err, col_err, propagate_nan=tl.PropagateNan.ALL)
            err = tl.where(sym, both, err)
        check = (tol > 0) & (((it % check_every) == 0) | (it == max_iter))
        # The safeguard of the over-relaxation, as the torch path: an error more than twice
        # the best one so far, plain updates from now on.
        omega = tl.where(check & (err > 2 * best_err), 1.0, omega)
        best_err = tl.where(check, tl.minimum(err, best_err), best_err)
        unconverged = (err >= tol) & (tl.abs(err) < float("inf"))
        going = (it < max_iter) & ((check == 0) | unconverged)

    plan = tl.exp(logk + u[:, None] + v[None, :])
    tl.store(plan_ptr + offs, plan, mask=mask)
    tl.store(u_ptr + pid * n + rows, u, mask=rmask)
    tl.store(v_ptr + pid * m + cols, v, mask=cmask)
    row_err = tl.sum(tl.where(rmask, tl.abs(tl.sum(plan, axis=1) - a), 0.0), axis=0)
    col_err = tl.sum(tl.where(cmask, tl.abs(tl.sum(plan, axis=0) - b), 0.0), axis=0)
    tl.store(iters_ptr + pid, it)
    tl.store(err_ptr + pid, tl.maximum(row_err, col_err, propagate_nan=tl.PropagateNan.ALL))
