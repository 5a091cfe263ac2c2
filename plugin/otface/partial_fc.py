"""Partial FC: model-parallel margin softmax with class-centre sampling.

An, X. et al., "Partial FC: Training 10 Million Identities on a Single Machine"
(arXiv 2010.05222) and "Killing Two Birds with One Stone" (arXiv 2203.15565). Semantics follow
arcface_torch's ``PartialFC_V2``: the class centres are split over the ranks, every rank sees the
whole global batch of embeddings (all-gathered with gradient), computes cosine logits against
its own shard, applies the margin, and the softmax cross-entropy is normalised across ranks
with two all-reduces (max, sum). The loss is the mean over the global batch.

Works with any torch.distributed backend (gloo on CPU, NCCL on CUDA) and without a process
group (one rank holding every class).

Caveat: the local batch size may change from call to call but must be the same on every rank
within one call (the all-gather needs equal shapes; this is not checked, as that would cost a
collective).
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional

import torch
from torch import nn
from torch.nn.functional import linear, normalize

from otface.dist import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_,
    get_rank,
    get_world_size,
)

__all__ = ["PartialFC", "dist_softmax_cross_entropy", "init_class_centres", "shard_range"]

# Class centres are drawn in blocks of this many rows, each block from its own generator, so a
# centre's initial value depends on (seed, class id, embedding size) only, not on the sharding.
_INIT_BLOCK = 4096
_INIT_STD = 0.01


def shard_range(num_classes: int, *, rank: int, world_size: int) -> tuple:
    """``(class_start, num_local)`` of ``rank``'s shard, arcface_torch's split.

    The first ``num_classes % world_size`` ranks hold one extra class.
    """
    base, extra = divmod(num_classes, world_size)
    num_local = base + int(rank < extra)
    class_start = base * rank + min(rank, extra)
    return class_start, num_local


def _mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64-style mixing)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def init_class_centres(
    class_start: int, num_local: int, embedding_size: int, *, seed: int
) -> torch.Tensor:
    """Float32 ``(num_local, embedding_size)`` centres ``N(0, 0.01²)`` from class ``class_start``.

    Row ``c`` of the full matrix is the same whatever the shard, so shards made for any world
    size concatenate to the same matrix. Only the blocks overlapping the shard are drawn.
    """
    out = torch.empty(num_local, embedding_size)
    end = class_start + num_local
    block = class_start // _INIT_BLOCK
    while block * _INIT_BLOCK < end:
        gen = torch.Generator().manual_seed(_mix_seed(seed, block))
        rows = torch.empty(_INIT_BLOCK, embedding_size).normal_(0.0, _INIT_STD, generator=gen)
        first = block * _INIT_BLOCK
        lo, hi = max(class_start, first), min(end, first + _INIT_BLOCK)
        out[lo - class_start : hi - class_start] = rows[lo - first : hi - first]
        block += 1
    return out


class _DistSoftmaxCE(torch.autograd.Function):
    """Mean softmax cross-entropy over rows whose classes are split across ranks."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        row_max = logits.detach().amax(dim=1, keepdim=True)
        all_reduce_(row_max, "max")
        probs = (logits.detach() - row_max).exp_()
        sum_exp = all_reduce_(probs.sum(dim=1, keepdim=True), "sum")
        # Fixed-shape masks, not index lists: no host sync for the number of rows this rank
        # holds. The shifted target logit is contributed by the one rank that holds the class.
        held = (labels != -1).unsqueeze(1)
        column = labels.clamp(min=0).unsqueeze(1)
        picked = logits.detach().gather(1, column) - row_max
        target = torch.where(held, picked, torch.zeros_like(picked))
        all_reduce_(target, "sum")
        probs.div_(sum_exp)
        ctx.save_for_backward(probs, labels)
        return (sum_exp.log() - target).mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        probs, labels = ctx.saved_tensors
        # d mean_i(-log p_i,y_i) / d z_ij = (p_ij - [j = y_i]) / N. A copy (not the saved
        # buffer, as arcface_torch does) so that retain_graph / gradcheck still work. Rows
        # whose class another rank holds add -0.0 to column 0, which changes nothing.
        grad = probs.clone()
        held = (labels != -1).unsqueeze(1)
        grad.scatter_add_(1, labels.clamp(min=0).unsqueeze(1), -held.to(grad.dtype))
        grad.mul_(grad_out / probs.shape[0])
        return grad, None


def dist_softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy, mean over rows, with the classes split across ranks.

    Args:
        logits: ``(N, C_local)`` this rank's logits for the whole (global) batch.
        labels: ``(N,)`` int64 local column of each row's class, ``-1`` when another rank holds
            it. Every row's class must be held by exactly one rank.

    Returns:
        Scalar ``mean_i [log Σ_ranks Σ_j exp z_ij − z_i,y_i]``, the same on every rank.
        Computed in log-sum-exp form (arcface_torch takes the log of a probability clamped at
        1e-30; the two agree except where that clamp bites).
    """
    return _DistSoftmaxCE.apply(logits, labels)


class PartialFC(nn.Module):
    """Class centres sharded over ranks plus margin softmax; arcface_torch's ``PartialFC_V2``.

    ``state_dict()`` is ``{"weight": (num_local, embedding_size)}`` with arcface_torch's sharding,
    so ``softmax_fc`` checkpoints move both ways.

    Args:
        margin_loss: ``f(cos (N, C_local), labels (N, 1)) -> logits (N, C_local)``, labels
            ``-1`` where the row's class is not in this shard (or not sampled); e.g.
            :class:`otface.margin.CombinedMarginLoss`. Labels are passed as a column, as
            arcface_torch does, so its margin modules fit too. A head with running statistics
            (:mod:`otface.heads`) sets ``needs_norms`` or ``needs_target_cos`` and is also
            given, for the whole global batch, the embedding norms before normalisation
            (``norms=``, ``(N,)``) or every row's target cosine (``target_cos=``, ``(N,)``).
        embedding_size: ``D``.
        num_classes: total number of classes over all ranks (``>= world_size``).
        sample_rate: fraction of this shard's centres used per step (``(0, 1]``). With
            ``< 1`` the positive centres of the global batch in this shard are always kept and
            random negatives fill up to ``max(1, int(sample_rate * num_local))``.
        fp16: compute the cosine logits under CUDA fp16 autocast (ignored on other devices).
        seed: seeds the centre initialisation (identical for any world size) and, with the step
            counter and rank, the class-centre sampling.

    Rank and world size are read from torch.distributed at construction (rank 0 of 1 when no
    process group is initialised).
    """

    def __init__(
        self,
        margin_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        embedding_size: int,
        num_classes: int,
        *,
        sample_rate: float = 1.0,
        fp16: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not callable(margin_loss):
            raise ValueError(f"margin_loss must be callable, got {type(margin_loss).__name__}")
        for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
            raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.rank = get_rank()
        self.world_size = get_world_size()
        if num_classes < self.world_size:
            raise ValueError(
                f"num_classes ({num_classes}) must be >= world size ({self.world_size}): "
                "every rank needs at least one class centre"
            )
        self.margin_softmax = margin_loss
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.fp16 = bool(fp16)
        self.seed = int(seed)
        self.class_start, self.num_local = shard_range(
            num_classes, rank=self.rank, world_size=self.world_size
        )
        self.num_sample = max(1, int(self.sample_rate * self.num_local))
        self.weight = nn.Parameter(
            init_class_centres(self.class_start, self.num_local, embedding_size, seed=self.seed)
        )
        self.step = 0
        # Local indices of the centres used by the last sampled forward (None: all used).
        self.sampled_index: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"rank={self.rank}/{self.world_size}, class_start={self.class_start}, "
            f"num_local={self.num_local}, sample_rate={self.sample_rate}, fp16={self.fp16}"
        )

    def _sample(self, local_labels: torch.Tensor, step: int):
        """Pick centres (positives + random negatives); return index and remapped labels."""
        with torch.no_grad():
            in_shard = local_labels != -1
            positive = torch.unique(local_labels[in_shard], sorted=True)
            if positive.numel() <= self.num_sample:
                device = self.weight.device
                gen = torch.Generator(device=device)
                gen.manual_seed(_mix_seed(self.seed, step, self.rank))
                score = torch.rand(self.num_local, generator=gen, device=device)
                score[positive] = 2.0
                index = torch.topk(score, k=self.num_sample).indices.sort().values
            else:
                index = positive
            remapped = local_labels.clone()
            remapped[in_shard] = torch.searchsorted(index, local_labels[in_shard])
        return index, remapped

    def _autocast(self, device: torch.device):
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16)
        if device.type == "cpu":
            return torch.autocast("cpu", enabled=False)
        return contextlib.nullcontext()

    def _gather_labels(self, labels: torch.Tensor) -> torch.Tensor:
        parts: List[torch.Tensor] = all_gather_no_grad(labels)
        return torch.cat(parts) if len(parts) > 1 else labels

    def _check_label_range(self, labels: torch.Tensor) -> None:
        """Labels in ``[0, num_classes)``. The training loader checks them once when the data is
        opened; here a CPU batch gets a clear error, and a CUDA batch a device-side assert
        (reading the bounds on the host would cost a sync every step)."""
        in_range = (labels.min() >= 0) & (labels.max() < self.num_classes)
        if labels.device.type == "cuda":
            torch._assert_async(in_range)
            return
        if not bool(in_range):
            bad = [int(v) for v in labels if not 0 <= int(v) < self.num_classes][0]
            raise ValueError(
                f"label {bad} is out of range: labels must be in [0, num_classes) "
                f"with num_classes={self.num_classes}"
            )

    def forward(
        self,
        local_embeddings: torch.Tensor,
        local_labels: torch.Tensor,
        *,
        step: Optional[int] = None,
    ) -> torch.Tensor:
        """Margin softmax loss, mean over the global batch.

        Args:
            local_embeddings: ``(B, D)`` this rank's embeddings; ``B`` equal on all ranks.
            local_labels: ``(B,)`` or ``(B, 1)`` integer class ids in ``[0, num_classes)``
                (not modified).
            step: seeds this call's centre sampling (``sample_rate < 1``); by default an
                internal counter, incremented on every sampled call, is used. Pass the
                training step to make sampling reproducible across resumes.

        Returns:
            Scalar loss, identical on every rank.

        Raises:
            ValueError: wrong shapes, or a label outside ``[0, num_classes)`` (raised on every
                rank, since the check runs on the gathered labels).
        """
        if get_world_size() != self.world_size:
            raise ValueError(
                f"PartialFC was built for world size {self.world_size}, "
                f"but the process group now has {get_world_size()} ranks"
            )
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"local_embeddings must have shape (B, {self.embedding_size}), "
                f"got {tuple(local_embeddings.shape)}"
            )
        batch = local_embeddings.shape[0]
        if batch == 0:
            raise ValueError("local_embeddings is an empty batch (B = 0)")
        if local_labels.numel() != batch or local_labels.dim() not in (1, 2):
            raise ValueError(
                f"local_labels must have shape ({batch},) or ({batch}, 1), "
                f"got {tuple(local_labels.shape)}"
            )
        if local_labels.is_floating_point() or local_labels.is_complex():
            raise ValueError(f"local_labels must be integers, got dtype {local_labels.dtype}")
        device = local_embeddings.device
        local_labels = local_labels.reshape(-1).to(device=device, dtype=torch.long)

        embeddings = torch.cat(all_gather_with_grad(local_embeddings))
        labels = self._gather_labels(local_labels)
        self._check_label_range(labels)

        in_shard = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        local = torch.where(in_shard, labels - self.class_start, torch.full_like(labels, -1))

        if self.sample_rate < 1.0:
            if step is None:
                step = self.step
                self.step += 1
            index, local = self._sample(local, step)
            self.sampled_index = index
            weight = self.weight[index]
        else:
            weight = self.weight

        with self._autocast(device):
            cos = linear(normalize(embeddings.to(weight.dtype)), normalize(weight))
        cos = cos.to(weight.dtype).clamp(-1.0, 1.0)
        logits = self.margin_softmax(
            cos, local.view(-1, 1), **self._head_inputs(embeddings, cos, local)
        )
        return dist_softmax_cross_entropy(logits, local)

    def _head_inputs(
        self, embeddings: torch.Tensor, cos: torch.Tensor, local: torch.Tensor
    ) -> dict:
        """What a head with running statistics (:mod:`otface.heads`) needs beyond the cosines,
        for the whole global batch: the embedding norms before normalisation (every rank has
        every embedding), or every row's target cosine (one all-reduce: each row's class is
        held by one rank, the others add 0). No gradient, no host read."""
        extra = {}
        if getattr(self.margin_softmax, "needs_norms", False):
            extra["norms"] = embeddings.detach().to(cos.dtype).norm(dim=1)
        if getattr(self.margin_softmax, "needs_target_cos", False):
            held = local != -1
            picked = cos.detach().gather(1, local.clamp(min=0).unsqueeze(1)).squeeze(1)
            extra["target_cos"] = all_reduce_(torch.where(held, picked, torch.zeros_like(picked)))
        return extra

    def statistics(self) -> dict:
        """The head's running statistics (AdaFace's norm mean and std, CurricularFace's t) as
        detached device scalars for the log; empty for the combined margin."""
        stats = getattr(self.margin_softmax, "statistics", None)
        return stats() if callable(stats) else {}
