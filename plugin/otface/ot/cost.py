"""Ground costs between point clouds for optimal transport."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cosine_cost"]


def cosine_cost(x: torch.Tensor, y: torch.Tensor, *, dim_eps: float = 1e-12) -> torch.Tensor:
    """Cosine cost ``C[b, i, j] = 1 - <x[b, i] / |x[b, i]|, y[b, j] / |y[b, j]|>``.

    The cost lies in ``[0, 2]``. It is computed in float32 (float64 stays float64) with autocast
    disabled, so that a half-precision feature map under AMP gives a full-precision cost; the
    gradient flows back to ``x`` and ``y`` in their own dtype.

    Args:
        x: ``(B, n, C)`` source points.
        y: ``(B, m, C)`` target points.
        dim_eps: floor of the norm in the normalisation (a zero vector gives cost 1).

    Returns:
        ``(B, n, m)`` cost matrices.
    """
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(
            f"cosine_cost expects (B, n, C) and (B, m, C) tensors, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(
            f"cosine_cost: batch and channel sizes must agree, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xn = F.normalize(x.to(dtype), dim=-1, eps=dim_eps)
        yn = F.normalize(y.to(dtype), dim=-1, eps=dim_eps)
        return 1.0 - torch.bmm(xn, yn.transpose(1, 2))
