"""Small torch.distributed helpers that also work when no process group exists.

Without an initialised process group everything behaves as a single rank: rank 0, world size 1,
gathers return ``[tensor]`` and reductions are identities. No collective is issued at import.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_no_grad",
    "all_gather_with_grad",
    "all_reduce_",
    "get_rank",
    "get_world_size",
    "is_distributed",
]


def is_distributed() -> bool:
    """True when torch.distributed is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank, or 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of ranks, or 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``tensor`` with ``op`` in {"sum", "max"}; identity on one rank."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX} if dist.is_available() else {}
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    if get_world_size() > 1:
        dist.all_reduce(tensor, ops[op])
    return tensor


def all_gather_no_grad(tensor: torch.Tensor) -> List[torch.Tensor]:
    """Gather ``tensor`` (same shape on every rank) from all ranks, without autograd.

    Returns:
        A list of ``world_size`` tensors shaped like ``tensor``, in rank order.
    """
    world_size = get_world_size()
    if world_size == 1:
        return [tensor]
    tensor = tensor.detach().contiguous()
    out = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(out, tensor)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, grad_scale: float):
        ctx.grad_scale = grad_scale
        ctx.rank = get_rank()
        ctx.batch = tensor.shape[0]
        return tuple(all_gather_no_grad(tensor))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        # Every rank holds a gradient for every gathered slice; the gradient of this rank's
        # input is the sum of what all ranks computed for its slice.
        stacked = torch.cat([g.contiguous() for g in grads], dim=0)
        dist.all_reduce(stacked, dist.ReduceOp.SUM)
        start = ctx.rank * ctx.batch
        grad = stacked[start : start + ctx.batch]
        if ctx.grad_scale != 1.0:
            grad = grad * ctx.grad_scale
        return grad, None


def all_gather_with_grad(
    tensor: torch.Tensor, *, compensate_ddp_average: bool = True
) -> List[torch.Tensor]:
    """Autograd-aware all-gather: every rank gets every rank's ``tensor``.

    In backward, the gradients that all ranks computed for this rank's slice are summed, so
    the gradient reaching ``tensor`` is that of the sum of all ranks' losses (each rank's loss
    being a function of the gathered tensors).

    Gradient scaling convention: a model-parallel loss (for example Partial FC) is the same
    global-batch loss ``L`` on every rank, each rank holding only a share of its terms; the
    summed gradient is ``dL/d(tensor)``. DistributedDataParallel then *averages* the backbone
    gradients over ranks, which would divide by ``world_size``. With
    ``compensate_ddp_average=True`` (the default, as arcface_torch) the returned gradient is
    multiplied by ``world_size``, so that after DDP's averaging the backbone gradient equals
    ``dL/d(parameters)`` of the global-batch loss.

    Args:
        tensor: ``(B, ...)``, the same shape on every rank.
        compensate_ddp_average: multiply the gradient by ``world_size`` (see above).

    Returns:
        A list of ``world_size`` tensors of shape ``(B, ...)`` in rank order; ``[tensor]`` when
        there is a single rank (no process group), which is then the identity.
    """
    world_size = get_world_size()
    if world_size == 1:
        return [tensor]
    scale = float(world_size) if compensate_ddp_average else 1.0
    return list(_AllGatherWithGrad.apply(tensor, scale))
