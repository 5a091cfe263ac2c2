"""Fused training-mode BatchNorm2d + PReLU: ``prelu(bn(x))`` in four Triton passes.

In an IResNet block the conv output goes through ``bn2`` (training mode: batch statistics)
and a per-channel PReLU. Eagerly that is a statistics pass, a normalise pass and a PReLU pass
forward, and as many backward, each reading or writing the whole activation. The fused op
does, on the ``(M, C)`` view of a channels_last (NHWC) activation with ``M = N * H * W``:

forward
    1. per-channel mean and biased variance over the ``M`` rows (two-level reduction: chunk
       partials merged with Chan et al.'s update, then one merge per channel, in float32;
       stable under a large common offset), running statistics updated in place;
    2. ``y = prelu(gamma * (x - mean) * rstd + beta)``, ``rstd = 1 / sqrt(var + eps)``.

backward (only ``x``, ``mean`` and ``rstd`` are kept, not the BatchNorm output)
    3. recomputing ``xhat`` and ``z = gamma * xhat + beta``, with ``g = dy`` where ``z > 0``
       and ``alpha * dy`` elsewhere: per-channel ``sum(g)``, ``sum(g * xhat)`` and
       ``sum(dy * z)`` over ``z <= 0`` — the gradients of ``beta``, ``gamma`` and ``alpha``;
    4. ``dx = gamma * rstd * (g - (sum(g) + xhat * sum(g * xhat)) / M)``.

The result equals :class:`torch.nn.BatchNorm2d` followed by :class:`torch.nn.PReLU`: the
same normalisation, ``running_var`` from the unbiased variance, ``momentum=None`` as a
cumulative average (read on the device, no host sync), ``num_batches_tracked`` incremented,
torch's PReLU gradient at ``z == 0``; the output and ``dx`` have the input's dtype and memory
format (float16 activations with float32 parameters, as under CUDA autocast, are fine).

Selection (``kernel``): ``"auto"`` uses the kernels for a training-mode affine BatchNorm on a
CUDA, channels_last, float16/bfloat16/float32 input when :mod:`triton` is installed, and the
modules themselves otherwise; ``"triton"`` always uses them in training mode (CUDA tensors, or
CPU tensors under ``TRITON_INTERPRET=1`` for tests; float64 too); ``"torch"`` never. Eval mode,
``affine=False`` and batches of at most one value per channel always run the modules.

Nothing here imports :mod:`triton` at module level; the kernel module is imported on first use.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "FUSED_BN_PRELU_CHOICES",
    "KERNEL_CHOICES",
    "available",
    "bn_prelu",
    "set_fused_bn_prelu",
]

KERNEL_CHOICES = ("auto", "triton", "torch")
"""Values of ``bn_prelu(..., kernel=)``."""

FUSED_BN_PRELU_CHOICES = ("off",) + KERNEL_CHOICES
"""Values of :func:`set_fused_bn_prelu`: ``"off"`` runs the plain modules."""

_ATTR = "fused_bn_prelu"
_AUTO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNEL_DTYPES = _AUTO_DTYPES + (torch.float64,)
# Elements of one BLOCK_M x BLOCK_C tile, widest channel block (128 bytes of a float16 row),
# reduction programs per SM, most chunks the merge takes at once. With 8 warps (16 elements a
# thread) the kernels compiled offline for sm_90 (ptxas of the Triton 3.9 wheel) take 54-108
# registers a thread for 16/32-bit inputs, none spilled; 4 warps took up to 168. Sized for an
# H100/H200; not yet timed there.
_TILE_ELEMS = 4096
_MAX_BLOCK_C = 64
_PROGRAMS_PER_SM = 8
_MAX_CHUNKS = 1024
_CPU_PROGRAMS = 8
_NUM_WARPS = 8


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether :mod:`triton` is installed (found without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class _Launch(NamedTuple):
    """Tiling of an ``(M, C)`` activation (see :mod:`._fused_bn_prelu_kernel`)."""

    block_c: int
    c_blocks: int
    block_m: int
    tiles: int  # tiles of BLOCK_M rows per reduction chunk
    rows_per_chunk: int
    n_chunks: int
    block_k: int  # power of two >= n_chunks, for the merge
    merge_block_c: int


def _launch_config(m_rows: int, channels: int, device: torch.device) -> _Launch:
    block_c = min(_pow2(channels), _MAX_BLOCK_C)
    c_blocks = _cdiv(channels, block_c)
    block_m = max(1, _TILE_ELEMS // block_c)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        programs = _PROGRAMS_PER_SM * _sm_count(index)
    else:
        programs = _CPU_PROGRAMS
    n_chunks = max(1, min(_cdiv(programs, c_blocks), _cdiv(m_rows, block_m), _MAX_CHUNKS))
    tiles = _cdiv(_cdiv(m_rows, n_chunks), block_m)
    rows_per_chunk = tiles * block_m
    n_chunks = _cdiv(m_rows, rows_per_chunk)
    block_k = _pow2(n_chunks)
    merge_block_c = max(1, min(_pow2(channels), _TILE_ELEMS // block_k))
    return _Launch(
        block_c, c_blocks, block_m, tiles, rows_per_chunk, n_chunks, block_k, merge_block_c
    )


def _check_kernel(kernel: str, choices: Tuple[str, ...], where: str) -> None:
    if kernel not in choices:
        valid = ", ".join(map(repr, choices))
        raise ValueError(f"{where}: kernel must be one of {valid}; got {kernel!r}")


def _use_kernel(x: torch.Tensor, bn: nn.BatchNorm2d, prelu: nn.PReLU, kernel: str) -> bool:
    """Whether ``bn_prelu`` runs the Triton kernels (raises where ``"triton"`` cannot)."""
    if kernel == "torch" or not bn.training or not bn.affine or x.dim() != 4:
        return False
    n, c, h, w = x.shape
    if n * h * w <= 1 or prelu.weight.numel() not in (1, c):
        return False  # the modules raise their own errors
    if kernel == "auto":
        return (
            x.is_cuda
            and x.dtype in _AUTO_DTYPES
            and x.is_contiguous(memory_format=torch.channels_last)
            and available()
        )
    if not available():
        raise ValueError("bn_prelu: kernel='triton' needs the triton package (pip install triton)")
    if not x.is_cuda and not _interpreted():
        raise ValueError(
            f"bn_prelu: kernel='triton' runs on CUDA tensors, or on CPU tensors under "
            f"TRITON_INTERPRET=1; got a {x.device.type} tensor"
        )
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(
            f"bn_prelu: kernel='triton' takes float16, bfloat16, float32 or float64 input; "
            f"got {x.dtype}"
        )
    return True


def _device_context(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _nhwc_rows(t: torch.Tensor) -> torch.Tensor:
    """The ``(N*H*W, C)`` row-major view of ``t`` (a copy unless ``t`` is channels_last)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).contiguous().view(n * h * w, c)


def _as_nchw(rows: torch.Tensor, shape: torch.Size, channels_last: bool) -> torch.Tensor:
    n, c, h, w = shape
    out = rows.view(n, h, w, c).permute(0, 3, 1, 2)
    return out if channels_last else out.contiguous()


class _BNPReLU(torch.autograd.Function):
    """``prelu(batch_norm(x))`` with batch statistics; see the module docstring."""

    @staticmethod
    def forward(ctx, x, gamma, beta, alpha, running, eps, momentum):
        from otface.backbones import _fused_bn_prelu_kernel as k

        n, c, h, w = x.shape
        m_rows = n * h * w
        x_rows = _nhwc_rows(x)
        is_fp64 = x.dtype == torch.float64
        acc_torch, acc = (torch.float64, k.ACC_FP64) if is_fp64 else (torch.float32, k.ACC_FP32)
        cfg = _launch_config(m_rows, c, x.device)
        new = functools.partial(torch.empty, dtype=acc_torch, device=x.device)
        mean_part, m2_part = new((cfg.n_chunks, c)), new((cfg.n_chunks, c))
        mean, rstd = new(c), new(c)
        y_rows = torch.empty_like(x_rows)
        alpha_stride = 0 if alpha.numel() == 1 else 1
        run_mean, run_var, nbt = running if running is not None else (mean, rstd, mean)
        with _device_context(x):
            k.stats_partial_kernel[(cfg.c_blocks, cfg.n_chunks)](
                x_rows, mean_part, m2_part, m_rows, c, cfg.tiles,
                BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, ACC=acc, num_warps=_NUM_WARPS,
            )  # fmt: skip
            k.stats_finalize_kernel[(_cdiv(c, cfg.merge_block_c),)](
                mean_part, m2_part, mean, rstd, run_mean, run_var, nbt,
                m_rows, c, cfg.n_chunks, cfg.rows_per_chunk, float(eps),
                0.0 if momentum is None else float(momentum),
                BLOCK_K=cfg.block_k, BLOCK_C=cfg.merge_block_c,
                UPDATE_RUNNING=running is not None, CUMULATIVE=momentum is None, ACC=acc,
                num_warps=_NUM_WARPS,
            )  # fmt: skip
            k.fwd_elementwise_kernel[(cfg.c_blocks, _cdiv(m_rows, cfg.block_m))](
                x_rows, y_rows, mean, rstd, gamma, beta, alpha, alpha_stride, m_rows, c,
                BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, ACC=acc, num_warps=_NUM_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(x_rows, gamma, beta, alpha, mean, rstd)
        ctx.shape = x.shape
        ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last)
        ctx.cfg, ctx.acc = cfg, acc
        return _as_nchw(y_rows, x.shape, ctx.channels_last)

    @staticmethod
    def backward(ctx, dy):
        from otface.backbones import _fused_bn_prelu_kernel as k

        need_x, need_gamma, need_beta, need_alpha = ctx.needs_input_grad[:4]
        nothing = (None,) * 3
        if not (need_x or need_gamma or need_beta or need_alpha):
            return (None,) * 4 + nothing
        x_rows, gamma, beta, alpha, mean, rstd = ctx.saved_tensors
        cfg, acc = ctx.cfg, ctx.acc
        m_rows, c = x_rows.shape
        dy_rows = _nhwc_rows(dy)
        alpha_stride = 0 if alpha.numel() == 1 else 1
        part = torch.empty((3, cfg.n_chunks, c), dtype=mean.dtype, device=mean.device)
        with _device_context(x_rows):
            k.bwd_reduce_kernel[(cfg.c_blocks, cfg.n_chunks)](
                x_rows, dy_rows, part, mean, rstd, gamma, beta, alpha, alpha_stride,
                m_rows, c, cfg.tiles, cfg.n_chunks,
                BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, ACC=acc, num_warps=_NUM_WARPS,
            )  # fmt: skip
            sums = part.sum(dim=1)  # (3, C): sum(g), sum(g * xhat), PReLU weight gradient
            dx = None
            if need_x:
                dx_rows = torch.empty_like(x_rows)
                k.bwd_elementwise_kernel[(cfg.c_blocks, _cdiv(m_rows, cfg.block_m))](
                    x_rows, dy_rows, dx_rows, sums, mean, rstd, gamma, beta, alpha,
                    alpha_stride, m_rows, c,
                    BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, ACC=acc, num_warps=_NUM_WARPS,
                )  # fmt: skip
                dx = _as_nchw(dx_rows, ctx.shape, ctx.channels_last)
        d_gamma = sums[1].to(gamma.dtype) if need_gamma else None
        d_beta = sums[0].to(beta.dtype) if need_beta else None
        d_alpha = None
        if need_alpha:
            d_alpha = (sums[2].sum().reshape(1) if alpha.numel() == 1 else sums[2]).to(alpha.dtype)
        return (dx, d_gamma, d_beta, d_alpha) + nothing


def bn_prelu(
    x: torch.Tensor, bn: nn.BatchNorm2d, prelu: nn.PReLU, *, kernel: str = "auto"
) -> torch.Tensor:
    """``prelu(bn(x))``, fused into Triton kernels for a training-mode BatchNorm.

    Same result and side effects as calling the two modules: in training mode the batch
    mean and biased variance over ``(N, H, W)`` normalise ``x``; ``bn.running_mean`` and
    ``bn.running_var`` (unbiased variance) are updated in place with ``bn.momentum`` (``None``:
    cumulative average) and ``bn.num_batches_tracked`` is incremented when
    ``bn.track_running_stats``. Statistics are accumulated in float32 (float64 for float64
    input). Gradients flow to ``x``, ``bn.weight``, ``bn.bias`` and ``prelu.weight``.

    Args:
        x: ``(N, C, H, W)`` activation; channels_last avoids a layout copy on the kernel path.
        bn: the BatchNorm2d over ``C`` channels.
        prelu: a PReLU with ``C`` weights or a single shared one.
        kernel: ``"auto"``, ``"triton"`` or ``"torch"`` (see the module docstring).

    Returns:
        ``(N, C, H, W)`` tensor of ``x``'s dtype and memory format.

    Raises:
        ValueError: an unknown ``kernel``; or, with ``kernel="triton"`` in training mode,
            Triton missing, a CPU tensor without ``TRITON_INTERPRET=1``, or a non-float input.
    """
    _check_kernel(kernel, KERNEL_CHOICES, "bn_prelu")
    if not _use_kernel(x, bn, prelu, kernel):
        return prelu(bn(x))
    running: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
    if bn.track_running_stats and bn.running_mean is not None:
        # As nn.BatchNorm2d: count the batch first; momentum=None then mixes in 1/count.
        bn.num_batches_tracked.add_(1)
        running = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    return _BNPReLU.apply(x, bn.weight, bn.bias, prelu.weight, running, bn.eps, bn.momentum)


def set_fused_bn_prelu(model: nn.Module, kernel: str) -> int:
    """Switch the BatchNorm + PReLU pairs of an IResNet (every basic block's, and the stem's) to
    :func:`bn_prelu`.

    Sets the ``fused_bn_prelu`` attribute of each :class:`~otface.backbones.IBasicBlock` and
    :class:`~otface.backbones.IResNet` (any submodule whose class declares it). The modules,
    their parameters and the ``state_dict`` are untouched; eval mode always runs the plain
    modules, so evaluation and ONNX export are unaffected. The feature layer ``bn2`` of the
    IResNet (no PReLU follows it) keeps its module. On the fused path the fused ``bn`` and
    ``prelu`` modules are not called, so hooks registered on them do not fire.

    Args:
        model: a network (or any module containing IResNet blocks).
        kernel: ``"off"`` (the plain modules, the default), ``"auto"``, ``"triton"`` or
            ``"torch"`` (see :func:`bn_prelu`).

    Returns:
        The number of modules set: the blocks and the stem (0 for a network that is not an
        IResNet, e.g. ``mbf``).

    Raises:
        ValueError: an unknown ``kernel``.
    """
    _check_kernel(kernel, FUSED_BN_PRELU_CHOICES, "set_fused_bn_prelu")
    count = 0
    for module in model.modules():
        if isinstance(getattr(type(module), _ATTR, None), str):
            setattr(module, _ATTR, kernel)
            count += 1
    return count
