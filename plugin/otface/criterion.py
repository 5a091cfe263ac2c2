"""The loss seam between the trainer and the losses, and the plain margin-softmax loss.

A criterion is an ``nn.Module`` built by a function registered in
:data:`otface.registry.LOSSES`; its ``forward(embeddings, labels, *, step)`` returns a
:class:`LossOutput`. Its ``partial_fc`` attribute holds the class centres (saved as
``state_dict_softmax_fc`` in ``checkpoint_gpu_{rank}.pt``, as arcface_torch does).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from otface.registry import LOSSES

__all__ = ["LossOutput", "MarginCriterion", "build_margin_loss", "build_partial_fc"]


class LossOutput(NamedTuple):
    """What a criterion returns.

    Attributes:
        loss: scalar tensor to back-propagate.
        metrics: detached scalar tensors to log (name → value); read with ``.item()`` only
            when a log line is written, so no device sync happens on other steps.
        terms: optional parts of ``loss`` with their graphs, for measurements on log steps
            (OTFace: ``"margin"``, ``"ot"`` (weighted) and the hooked ``"features"``; see
            :mod:`otface.train.grad_share`); None when there are none.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    terms: Optional[dict] = None


def build_margin_loss(cfg) -> nn.Module:
    """The margin head of ``cfg.head`` (scale 64): arcface_torch's combined margin from
    ``cfg.margin_list`` (``"combined"``), or AdaFace or CurricularFace (:mod:`otface.heads`)."""
    from otface.heads import build_head
    from otface.margin import CombinedMarginLoss

    head = build_head(cfg, scale=64.0)
    if head is not None:
        return head
    m1, m2, m3 = cfg.margin_list
    return CombinedMarginLoss(
        64.0,
        m1,
        m2,
        m3,
        interclass_filtering_threshold=cfg.interclass_filtering_threshold,
        exact_grad=cfg.margin_exact_grad,
    )


def build_partial_fc(cfg, *, rank: int, world_size: int) -> nn.Module:
    """Partial FC over ``world_size`` ranks with the config's margin loss."""
    from otface.partial_fc import PartialFC

    return PartialFC(
        build_margin_loss(cfg),
        cfg.embedding_size,
        cfg.num_classes,
        sample_rate=cfg.sample_rate,
        fp16=cfg.fp16,
        seed=cfg.seed,
    )


class MarginCriterion(nn.Module):
    """Partial-FC margin softmax (ArcFace, CosFace or combined margins, as arcface_torch;
    AdaFace or CurricularFace by ``cfg.head``)."""

    def __init__(self, cfg, *, rank: int, world_size: int) -> None:
        super().__init__()
        self.partial_fc = build_partial_fc(cfg, rank=rank, world_size=world_size)

    def prepare_step(self, step: int) -> None:
        """Set what changes with the step before a ``forward(..., step=None)``: nothing here
        (subclasses such as OTFace's fill their per-step values on the device)."""

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, *, step: int | None
    ) -> LossOutput:
        loss = self.partial_fc(embeddings, labels, step=step)
        # The head's running statistics (AdaFace: head_norm_mean, head_norm_std; CurricularFace:
        # head_t), after this batch's update; none for the combined margin.
        return LossOutput(loss, {"loss_margin": loss.detach(), **self.partial_fc.statistics()})


@LOSSES.register("arcface")
def _build_arcface(cfg, *, backbone: nn.Module, rank: int, world_size: int) -> nn.Module:
    return MarginCriterion(cfg, rank=rank, world_size=world_size)
