"""Triton whole-solve Sinkhorn kernels: one program per problem, all iterations in one launch.

Private: this module imports :mod:`triton` at its top, so it is imported only by
:func:`otface.ot.triton_sinkhorn.sinkhorn_triton` when a kernel is first launched (importing
:mod:`otface` never imports Triton). Whether ``triton.jit`` compiles or interprets is decided
when this module is first imported (``TRITON_INTERPRET=1``: interpreted, on CPU tensors).

Both kernels run the same iteration as the torch path of :mod:`otface.ot.torch_sinkhorn`
(same update order, same averaged updates for symmetric problems, same convergence test and
over-relaxation safeguard), on one problem per program, with ``K = -C / eps``. Each program
stops on its own: the loop is a device-side ``while`` whose condition is the problem's own
marginal error, checked every ``check_every`` iterations and at ``max_iter``. Nothing is read
on the host, so a launch can be captured in a CUDA graph.

* :func:`sinkhorn_kernel` holds the whole (padded) ``K`` and both potentials in registers for
  all iterations: for small problems (64 x 64 is 16 KiB of registers a program).
* :func:`sinkhorn_tiled_kernel` holds nothing of size ``n x m``: each half iteration streams
  the cost from global memory (L2-resident at these sizes) in ``TILE_N x TILE_M`` tiles and
  reduces it with an online log-sum-exp (running max and rescaled sum, as in FlashAttention);
  the potentials and the row log-sum-exp live in global memory (the ``u``, ``v`` outputs and a
  ``(B, n)`` scratch), written and read by the program's own threads between barriers. Its
  size is bounded by time, not registers; the tile padding is at most one tile a dimension.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["sinkhorn_kernel", "sinkhorn_tiled_kernel"]


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
def _stage_eps(e, stage, anneal):
    # eps-scaling: after annealing iteration ``stage`` (from 0) at eps ``e``, the next eps
    # (``e * scaling``, and the target eps after the last stage) and the ratio ``e / e_next``
    # by which the potentials are carried to it (the dual potentials kept in cost units).
    eps_start, n_stages, scaling, eps = anneal
    e_next = tl.maximum(e * scaling, eps)
    e_next = tl.where(stage + 1 == n_stages, eps, e_next)
    return e_next, e / e_next


@triton.jit
def _stop_test(row_err, col_err, it, omega, best_err, stop):
    # After iteration ``it``, the convergence test and the over-relaxation safeguard of both
    # kernels, as in the torch path; returns (going on, omega, best error at a check so far,
    # the error). The error is the larger of the current plan's L1 row and column errors
    # (both count: an over-relaxed v update leaves the columns inexact), and it is what the
    # kernel reports. A non-finite error (NaN cost) stops the problem, as the torch path
    # leaves it out of its batch-wide test. The safeguard: an error at a check more than
    # twice the best one so far, plain updates from now on.
    tol, max_iter, check_every = stop
    err = tl.maximum(row_err, col_err, propagate_nan=tl.PropagateNan.ALL)
    check = (tol > 0) & (((it % check_every) == 0) | (it == max_iter))
    omega = tl.where(check & (err > 2 * best_err), 1.0, omega)
    best_err = tl.where(check, tl.minimum(err, best_err), best_err)
    unconverged = (err >= tol) & (tl.abs(err) < float("inf"))
    going = (it < max_iter) & ((check == 0) | unconverged)
    return going, omega, best_err, err


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
    anneal,
    stop,
    relaxation,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_SYM: tl.constexpr,
):
    """Solve problem ``program_id(0)``. All tensors contiguous.

    Shapes: ``cost`` (float32, float16 or bfloat16, read as float32) and ``plan`` (float32)
    ``(B, n, m)``; ``a``, ``u`` ``(B, n)`` and ``b``, ``v`` ``(B, m)`` float32; ``sym``
    ``(B,)`` int8, read only when ``HAS_SYM`` (then ``n == m`` and ``BLOCK_N == BLOCK_M``);
    ``iters`` ``(B,)`` int32; ``err`` ``(B,)`` float32, the last iteration's L1 marginal
    error as the stop test measured it (see :func:`_stop_test`). ``BLOCK_N >= n`` and
    ``BLOCK_M >= m`` are powers of two; the padding is masked. ``neg_inv_eps = -1 / eps``.
    ``anneal = (eps_start, n_stages, scaling, eps)``: ``n_stages`` annealing iterations (eps
    ``eps_start * scaling^k``, then ``eps``) come first and count as iterations, as in the
    torch path. ``stop = (tol, max_iter, check_every)``: the stop rule of :func:`_stop_test`.
    ``relaxation``: the over-relaxation of the later iterations (1: plain), safeguarded as in
    the torch path.
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
    e = anneal[0]  # eps_start
    n_stages = anneal[1]
    stage = 0
    while stage < n_stages:
        stage_logk = tl.where(mask, c * (-1.0 / e), -float("inf"))
        stage_row = _lse(stage_logk + v[None, :], 1)
        u, v, _ = _update(
            stage_logk, stage_row, u, v, log_a, log_b, rmask, cmask, 1.0, sym, HAS_SYM
        )
        e_next, ratio = _stage_eps(e, stage, anneal)
        stage += 1
        u = tl.where(rmask & (a > 0), log_a + (u - log_a) * ratio, u)
        v = tl.where(cmask & (b > 0), log_b + (v - log_b) * ratio, v)
        e = e_next
    lse_row = _lse(logk + v[None, :], 1)
    it = n_stages
    going = stop[1] > n_stages  # max_iter
    omega = relaxation
    best_err = float("inf")
    err = float("nan")  # (the loop runs at least once: max_iter > n_stages)
    while going:
        u, v, lse_col = _update(
            logk, lse_row, u, v, log_a, log_b, rmask, cmask, omega, sym, HAS_SYM
        )
        lse_row = _lse(logk + v[None, :], 1)
        it += 1
        row_err = tl.sum(tl.where(rmask, tl.abs(tl.exp(u + lse_row) - a), 0.0), axis=0)
        col_err = tl.sum(tl.where(cmask, tl.abs(tl.exp(v + lse_col) - b), 0.0), axis=0)
        going, omega, best_err, err = _stop_test(row_err, col_err, it, omega, best_err, stop)

    plan = tl.exp(logk + u[:, None] + v[None, :])
    tl.store(plan_ptr + offs, plan, mask=mask)
    tl.store(u_ptr + pid * n + rows, u, mask=rmask)
    tl.store(v_ptr + pid * m + cols, v, mask=cmask)
    tl.store(iters_ptr + pid, it)
    tl.store(err_ptr + pid, err)


# The tiled kernel. Its potentials, and the row log-sum-exp that the next u update reads, are
# kept in global memory, written by one pass and read by the next after a barrier (a CTA-wide
# bar.sync, which makes a thread's global writes visible to the CTA's other threads). A pass
# that reads a value and writes it back (u, v) has a barrier between the two: a value can be
# held by several threads (replicated layouts), and none may write it before all have read it.


@triton.jit
def _merge_lse(mx, s, x, AXIS: tl.constexpr):
    # Online log-sum-exp along AXIS: (running max, sum of exp(. - max)) merged with tile x.
    # All -inf so far keeps (-inf, 0), like _lse; a NaN in x makes the sum NaN.
    new_mx = tl.maximum(mx, tl.max(x, axis=AXIS))
    safe = tl.where(new_mx == -float("inf"), 0.0, new_mx)
    s = s * tl.exp(mx - safe) + tl.sum(tl.exp(x - tl.expand_dims(safe, AXIS)), axis=AXIS)
    return new_mx, s


@triton.jit
def _lse_of(mx, s):
    return tl.where(mx == -float("inf"), 0.0, mx) + tl.log(s)


@triton.jit
def _cost_tile(cost_ptr, rows, cols, n, m, scale):
    # K = C * scale of one tile, -inf outside the problem.
    mask = (rows < n)[:, None] & (cols < m)[None, :]
    c = tl.load(cost_ptr + rows[:, None] * m + cols[None, :], mask=mask, other=0.0)
    return tl.where(mask, c.to(tl.float32) * scale, -float("inf"))


@triton.jit
def _row_pass(
    cost_ptr, a_ptr, u_ptr, v_ptr, lse_ptr, n, m, scale, TN: tl.constexpr, TM: tl.constexpr
):
    # lse_row = LSE_j(K + v) into lse_ptr; returns the L1 row error sum |exp(u + lse_row) - a|.
    err = tl.zeros([TN], dtype=tl.float32)
    for i0 in range(0, n, TN):
        rows = i0 + tl.arange(0, TN)
        rmask = rows < n
        mx = tl.full([TN], -float("inf"), dtype=tl.float32)
        s = tl.zeros([TN], dtype=tl.float32)
        for j0 in range(0, m, TM):
            cols = j0 + tl.arange(0, TM)
            v = tl.load(v_ptr + cols, mask=cols < m, other=0.0)
            mx, s = _merge_lse(mx, s, _cost_tile(cost_ptr, rows, cols, n, m, scale) + v[None, :], 1)
        lse = _lse_of(mx, s)
        tl.store(lse_ptr + rows, lse, mask=rmask)
        u = tl.load(u_ptr + rows, mask=rmask, other=0.0)
        a = tl.load(a_ptr + rows, mask=rmask, other=1.0)
        err += tl.where(rmask, tl.abs(tl.exp(u + lse) - a), 0.0)
    return tl.sum(err, axis=0)


@triton.jit
def _u_pass(a_ptr, u_ptr, v_ptr, lse_ptr, n, omega, sym, HAS_SYM: tl.constexpr, TN: tl.constexpr):
    # u <- step(u, log a - lse_row), from the lse_row of the last row pass.
    for i0 in range(0, n, TN):
        rows = i0 + tl.arange(0, TN)
        rmask = rows < n
        log_a = tl.log(tl.load(a_ptr + rows, mask=rmask, other=1.0))
        u = tl.load(u_ptr + rows, mask=rmask, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        if HAS_SYM:  # n == m: the averaged update reads v at the same index
            other = tl.load(v_ptr + rows, mask=rmask, other=0.0)
        else:
            other = u
        u = _step(u, log_a - lse, other, log_a, rmask, omega, sym, HAS_SYM)
        tl.debug_barrier()
        tl.store(u_ptr + rows, u, mask=rmask)


@triton.jit
def _col_pass(
    cost_ptr,
    b_ptr,
    u_ptr,
    v_ptr,
    n,
    m,
    scale,
    omega,
    sym,
    HAS_SYM: tl.constexpr,
    TN: tl.constexpr,
    TM: tl.constexpr,
):
    # v <- step(v, log b - LSE_i(K + u)); returns the L1 column error of the new v.
    err = tl.zeros([TM], dtype=tl.float32)
    for j0 in range(0, m, TM):
        cols = j0 + tl.arange(0, TM)
        cmask = cols < m
        mx = tl.full([TM], -float("inf"), dtype=tl.float32)
        s = tl.zeros([TM], dtype=tl.float32)
        for i0 in range(0, n, TN):
            rows = i0 + tl.arange(0, TN)
            u = tl.load(u_ptr + rows, mask=rows < n, other=0.0)
            mx, s = _merge_lse(mx, s, _cost_tile(cost_ptr, rows, cols, n, m, scale) + u[:, None], 0)
        lse = _lse_of(mx, s)
        b = tl.load(b_ptr + cols, mask=cmask, other=1.0)
        log_b = tl.log(b)
        v = tl.load(v_ptr + cols, mask=cmask, other=0.0)
        if HAS_SYM:  # n == m: the averaged update reads u at the same index
            other = tl.load(u_ptr + cols, mask=cmask, other=0.0)
        else:
            other = v
        v = _step(v, log_b - lse, other, log_b, cmask, omega, sym, HAS_SYM)
        tl.debug_barrier()
        tl.store(v_ptr + cols, v, mask=cmask)
        err += tl.where(cmask, tl.abs(tl.exp(v + lse) - b), 0.0)
    return tl.sum(err, axis=0)


@triton.jit
def _rescale_pass(w_ptr, p_ptr, size, ratio, T: tl.constexpr):
    # eps-scaling: the potential carried to the next eps (dual potential kept in cost units).
    for i0 in range(0, size, T):
        idx = i0 + tl.arange(0, T)
        msk = idx < size
        w = tl.load(w_ptr + idx, mask=msk, other=1.0)
        p = tl.load(p_ptr + idx, mask=msk, other=0.0)
        log_w = tl.log(w)
        p = tl.where(w > 0, log_w + (p - log_w) * ratio, p)
        tl.debug_barrier()
        tl.store(p_ptr + idx, p, mask=msk)


@triton.jit
def sinkhorn_tiled_kernel(
    cost_ptr,
    a_ptr,
    b_ptr,
    sym_ptr,
    plan_ptr,
    u_ptr,
    v_ptr,
    lse_ptr,
    iters_ptr,
    err_ptr,
    n,
    m,
    neg_inv_eps,
    anneal,
    stop,
    relaxation,
    TILE_N: tl.constexpr,
    TILE_M: tl.constexpr,
    HAS_SYM: tl.constexpr,
):
    """Solve problem ``program_id(0)`` tile by tile. All tensors contiguous.

    The arguments are those of :func:`sinkhorn_kernel`, plus ``lse`` ``(B, n)`` float32
    scratch, and with ``TILE_N``, ``TILE_M`` (powers of two) the tile shape instead of the
    blocks; any ``n``, ``m`` (``n == m`` with ``HAS_SYM``).
    """
    pid = tl.program_id(0).to(tl.int64)
    cost_ptr += pid * n * m
    plan_ptr += pid * n * m
    a_ptr += pid * n
    u_ptr += pid * n
    lse_ptr += pid * n
    b_ptr += pid * m
    v_ptr += pid * m
    if HAS_SYM:
        sym = tl.load(sym_ptr + pid) != 0
    else:
        sym = pid < 0  # not read
    for i0 in range(0, n, TILE_N):
        rows = i0 + tl.arange(0, TILE_N)
        tl.store(u_ptr + rows, tl.zeros([TILE_N], dtype=tl.float32), mask=rows < n)
    for j0 in range(0, m, TILE_M):
        cols = j0 + tl.arange(0, TILE_M)
        tl.store(v_ptr + cols, tl.zeros([TILE_M], dtype=tl.float32), mask=cols < m)
    tl.debug_barrier()

    # eps-scaling: one iteration at each larger eps, the potentials carried in cost units.
    e = anneal[0]  # eps_start
    n_stages = anneal[1]
    stage = 0
    while stage < n_stages:
        scale = -1.0 / e
        _row_pass(cost_ptr, a_ptr, u_ptr, v_ptr, lse_ptr, n, m, scale, TILE_N, TILE_M)
        tl.debug_barrier()
        _u_pass(a_ptr, u_ptr, v_ptr, lse_ptr, n, 1.0, sym, HAS_SYM, TILE_N)
        tl.debug_barrier()
        _col_pass(cost_ptr, b_ptr, u_ptr, v_ptr, n, m, scale, 1.0, sym, HAS_SYM, TILE_N, TILE_M)
        tl.debug_barrier()
        e_next, ratio = _stage_eps(e, stage, anneal)
        stage += 1
        _rescale_pass(a_ptr, u_ptr, n, ratio, TILE_N)
        _rescale_pass(b_ptr, v_ptr, m, ratio, TILE_M)
        tl.debug_barrier()
        e = e_next
    _row_pass(cost_ptr, a_ptr, u_ptr, v_ptr, lse_ptr, n, m, neg_inv_eps, TILE_N, TILE_M)
    tl.debug_barrier()
    it = n_stages
    going = stop[1] > n_stages  # max_iter
    omega = relaxation
    best_err = float("inf")
    err = float("nan")  # (the loop runs at least once: max_iter > n_stages)
    while going:
        _u_pass(a_ptr, u_ptr, v_ptr, lse_ptr, n, omega, sym, HAS_SYM, TILE_N)
        tl.debug_barrier()
        col_err = _col_pass(
            cost_ptr, b_ptr, u_ptr, v_ptr, n, m, neg_inv_eps, omega, sym, HAS_SYM, TILE_N, TILE_M
        )
        tl.debug_barrier()
        row_err = _row_pass(
            cost_ptr, a_ptr, u_ptr, v_ptr, lse_ptr, n, m, neg_inv_eps, TILE_N, TILE_M
        )
        tl.debug_barrier()
        it += 1
        going, omega, best_err, err = _stop_test(row_err, col_err, it, omega, best_err, stop)

    # The plan, tile by tile; its error is the last iteration's, the one the stop test used.
    for i0 in range(0, n, TILE_N):
        rows = i0 + tl.arange(0, TILE_N)
        rmask = rows < n
        u = tl.load(u_ptr + rows, mask=rmask, other=0.0)
        for j0 in range(0, m, TILE_M):
            cols = j0 + tl.arange(0, TILE_M)
            v = tl.load(v_ptr + cols, mask=cols < m, other=0.0)
            logk = _cost_tile(cost_ptr, rows, cols, n, m, neg_inv_eps)
            plan = tl.exp(logk + u[:, None] + v[None, :])
            mask = rmask[:, None] & (cols < m)[None, :]
            tl.store(plan_ptr + rows[:, None] * m + cols[None, :], plan, mask=mask)
    tl.store(iters_ptr + pid, it)
    tl.store(err_ptr + pid, err)
