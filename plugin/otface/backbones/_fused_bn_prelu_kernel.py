"""Triton kernels of the fused training-mode BatchNorm2d + PReLU (forward and backward).

Private: this module imports :mod:`triton` at its top, so it is imported only by
:mod:`otface.backbones.fused_bn_prelu` when a kernel is first launched (importing
:mod:`otface` never imports Triton). Whether ``triton.jit`` compiles or interprets is decided
when this module is first imported (``TRITON_INTERPRET=1``: interpreted, on CPU tensors).

All kernels see the activation as the ``(M, C)`` row-major view of an NHWC tensor
(``M = N * H * W`` rows, one column per channel) and tile it ``BLOCK_M x BLOCK_C``. The two
reductions split the rows into ``n_chunks`` chunks of ``TILES * BLOCK_M`` rows; program
``(cb, k)`` reduces channel block ``cb`` over chunk ``k`` and writes one partial per channel,
so no atomics are needed and the result does not depend on scheduling. ``ACC`` is the
accumulation dtype (float32, or float64 for a float64 input).

Notation: ``xhat = (x - mean) * rstd``, ``z = gamma * xhat + beta`` (the BatchNorm output),
``y = z if z > 0 else alpha * z`` (PReLU, torch's convention at ``z == 0``).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "ACC_FP32",
    "ACC_FP64",
    "bwd_elementwise_kernel",
    "bwd_reduce_kernel",
    "fwd_elementwise_kernel",
    "stats_finalize_kernel",
    "stats_partial_kernel",
]

ACC_FP32 = tl.float32
ACC_FP64 = tl.float64


@triton.jit
def _channel_params(
    mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, alpha_ptr, alpha_stride, cols, cmask, ACC
):
    """Per-channel ``mean``, ``rstd``, ``gamma``, ``beta`` and PReLU ``alpha`` of the channels
    ``cols`` (0 where masked), as ``ACC``. ``alpha_stride`` is 1 for one PReLU weight per
    channel, 0 for a single shared weight."""
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0).to(ACC)
    gamma = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(ACC)
    beta = tl.load(beta_ptr + cols, mask=cmask, other=0.0).to(ACC)
    alpha = tl.load(alpha_ptr + cols * alpha_stride, mask=cmask, other=0.0).to(ACC)
    return mean, rstd, gamma, beta, alpha


@triton.jit
def _tile(M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's ``BLOCK_M x BLOCK_C`` tile of the ``(M, C)`` view (program ids: channel
    block, row block): its columns, their mask, the tile's mask and element offsets."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    return cols, cmask, mask, offs


@triton.jit
def stats_partial_kernel(
    x_ptr,
    mean_part_ptr,
    m2_part_ptr,
    M,
    C,
    TILES,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """Mean and sum of squared deviations ``M2`` of each channel over one chunk of rows.

    Each tile is reduced in two passes over registers (tile mean, then squared deviations
    from it) and merged into the chunk's running pair with Chan et al.'s update, so a large
    common offset (mean 100, std 1) does not cancel as in ``sum(x^2) - sum(x)^2 / n``.
    Writes ``mean_part[k, c]`` and ``m2_part[k, c]`` (``ACC``, shape ``(n_chunks, C)``).
    """
    cb = tl.program_id(0)
    k = tl.program_id(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    count = tl.full([], 0.0, ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for t in range(TILES):
        start = (k * TILES + t) * BLOCK_M
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        n_t = tl.minimum(tl.maximum(M - start, 0), BLOCK_M).to(ACC)
        mean_t = tl.sum(x, axis=0) / tl.maximum(n_t, 1.0)
        dev = tl.where(mask, x - mean_t[None, :], 0.0)
        m2_t = tl.sum(dev * dev, axis=0)
        total = count + n_t
        w_t = n_t / tl.maximum(total, 1.0)
        delta = mean_t - mean
        mean = mean + delta * w_t
        m2 = m2 + m2_t + delta * delta * count * w_t
        count = total
    tl.store(mean_part_ptr + k * C + cols, mean, mask=cmask)
    tl.store(m2_part_ptr + k * C + cols, m2, mask=cmask)


@triton.jit
def stats_finalize_kernel(
    mean_part_ptr,
    m2_part_ptr,
    mean_ptr,
    rstd_ptr,
    run_mean_ptr,
    run_var_ptr,
    nbt_ptr,
    M,
    C,
    n_chunks,
    rows_per_chunk,
    eps: tl.float64,
    momentum: tl.float64,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    ACC: tl.constexpr,
):
    """Merge the chunks' partials of one channel block; write ``mean``, ``rstd``; update the
    running statistics in place.

    All ``n_chunks <= BLOCK_K`` partials are merged at once: the mean is the count-weighted
    mean of the chunk means, taken relative to chunk 0's mean so that the sum does not carry
    the common offset, and ``M2 = sum(M2_k) + sum(n_k (mean_k - mean)^2)``. Normalisation
    uses the biased variance ``M2 / M``; ``running_var`` gets the unbiased ``M2 / (M - 1)``
    (``M > 1``), mixed in with factor ``momentum``, or ``1 / num_batches_tracked`` when
    ``CUMULATIVE`` (``momentum=None``; the counter is read on the device, already
    incremented), as :class:`torch.nn.BatchNorm2d`. Running buffers may be of any float dtype.
    """
    cb = tl.program_id(0)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < n_chunks
    mask = kmask[:, None] & cmask[None, :]
    offs = ks[:, None] * C + cols[None, :]
    part_mean = tl.load(mean_part_ptr + offs, mask=mask, other=0.0)
    part_m2 = tl.load(m2_part_ptr + offs, mask=mask, other=0.0)
    n_k = tl.minimum(tl.maximum(M - ks * rows_per_chunk, 0), rows_per_chunk).to(ACC)
    n_k = tl.where(kmask, n_k, 0.0)
    shift = tl.load(mean_part_ptr + cols, mask=cmask, other=0.0)
    rel = tl.where(mask, part_mean - shift[None, :], 0.0)
    mean_rel = tl.sum(rel * n_k[:, None], axis=0) / M
    dev = rel - mean_rel[None, :]
    m2 = tl.sum(part_m2, axis=0) + tl.sum(dev * dev * n_k[:, None], axis=0)
    mean = shift + mean_rel
    var = m2 / M
    # eps and momentum arrive in float64 (a float argument would be rounded to float32, off by
    # 1.5e-9 relative for momentum 0.1) and are rounded to ACC here.
    eps = tl.full([], eps, ACC)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    if ACC == tl.float64:
        std = tl.sqrt(var + eps)
    else:
        std = tl.sqrt_rn(var + eps)  # IEEE-rounded; tl.sqrt may be approximate in float32
    tl.store(rstd_ptr + cols, 1.0 / std, mask=cmask)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / tl.load(nbt_ptr).to(ACC)
        else:
            factor = tl.full([], momentum, ACC)
        rm = tl.load(run_mean_ptr + cols, mask=cmask, other=0.0).to(ACC)
        rv = tl.load(run_var_ptr + cols, mask=cmask, other=0.0).to(ACC)
        unbiased = m2 / (M - 1)
        tl.store(run_mean_ptr + cols, rm + factor * (mean - rm), mask=cmask)
        tl.store(run_var_ptr + cols, rv + factor * (unbiased - rv), mask=cmask)


@triton.jit
def fwd_elementwise_kernel(
    x_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    gamma_ptr,
    beta_ptr,
    alpha_ptr,
    alpha_stride,
    M,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """``y = prelu(gamma * (x - mean) * rstd + beta)`` on one tile, stored in ``y``'s dtype.

    ``alpha_stride`` is 1 for one PReLU weight per channel, 0 for a single shared weight.
    """
    cols, cmask, mask, offs = _tile(M, C, BLOCK_M, BLOCK_C)
    mean, rstd, gamma, beta, alpha = _channel_params(
        mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, alpha_ptr, alpha_stride, cols, cmask, ACC
    )
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    z = (x - mean[None, :]) * (rstd * gamma)[None, :] + beta[None, :]
    y = tl.where(z > 0, z, z * alpha[None, :])
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bwd_reduce_kernel(
    x_ptr,
    dy_ptr,
    part_ptr,
    mean_ptr,
    rstd_ptr,
    gamma_ptr,
    beta_ptr,
    alpha_ptr,
    alpha_stride,
    M,
    C,
    TILES,
    n_chunks,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per-chunk partial sums for the backward pass, recomputing ``z`` from ``x``.

    With ``g = dL/dz = dy if z > 0 else alpha * dy`` writes, into ``part`` (``ACC``, shape
    ``(3, n_chunks, C)``): ``sum(g)`` (the BatchNorm bias gradient), ``sum(g * xhat)`` (the
    weight gradient) and ``sum(dy * z)`` over ``z <= 0`` (the PReLU weight gradient).
    """
    cb = tl.program_id(0)
    k = tl.program_id(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, rstd, gamma, beta, alpha = _channel_params(
        mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, alpha_ptr, alpha_stride, cols, cmask, ACC
    )
    sum_g = tl.zeros([BLOCK_C], dtype=ACC)
    sum_gxhat = tl.zeros([BLOCK_C], dtype=ACC)
    sum_alpha = tl.zeros([BLOCK_C], dtype=ACC)
    for t in range(TILES):
        rows = (k * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        # Masked entries read dy = 0, so they add nothing to any of the three sums.
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        xhat = (x - mean[None, :]) * rstd[None, :]
        z = xhat * gamma[None, :] + beta[None, :]
        pos = z > 0
        g = tl.where(pos, dy, dy * alpha[None, :])
        sum_g += tl.sum(g, axis=0)
        sum_gxhat += tl.sum(g * xhat, axis=0)
        sum_alpha += tl.sum(tl.where(pos, 0.0, dy * z), axis=0)
    base = k * C + cols
    tl.store(part_ptr + base, sum_g, mask=cmask)
    tl.store(part_ptr + n_chunks * C + base, sum_gxhat, mask=cmask)
    tl.store(part_ptr + 2 * n_chunks * C + base, sum_alpha, mask=cmask)


@triton.jit
def bwd_elementwise_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    sums_ptr,
    mean_ptr,
    rstd_ptr,
    gamma_ptr,
    beta_ptr,
    alpha_ptr,
    alpha_stride,
    M,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """``dx = gamma * rstd * (g - (sum(g) + xhat * sum(g * xhat)) / M)`` on one tile.

    ``sums`` is ``(3, C)``: the chunk-summed partials of :func:`bwd_reduce_kernel`.
    """
    cols, cmask, mask, offs = _tile(M, C, BLOCK_M, BLOCK_C)
    mean, rstd, gamma, beta, alpha = _channel_params(
        mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, alpha_ptr, alpha_stride, cols, cmask, ACC
    )
    mean_g = tl.load(sums_ptr + cols, mask=cmask, other=0.0).to(ACC) / M
    mean_gxhat = tl.load(sums_ptr + C + cols, mask=cmask, other=0.0).to(ACC) / M
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    xhat = (x - mean[None, :]) * rstd[None, :]
    z = xhat * gamma[None, :] + beta[None, :]
    g = tl.where(z > 0, dy, dy * alpha[None, :])
    dx = (gamma * rstd)[None, :] * (g - mean_g[None, :] - xhat * mean_gxhat[None, :])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
