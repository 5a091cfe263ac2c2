"""The OTFace criterion: partial-FC margin softmax plus an OT loss on hard triplets,
``L = L_margin + lambda(step) * L_OT`` (design spec §2).

``L_OT`` and its options (modes, variants, distances, masked tokens) are
:func:`otface.hard_triplet_ot.hard_triplet_ot_loss`; this module adds the warm-up of
``lambda`` (:func:`lambda_at`), the feature hook and the ``"otface"`` entry of
:data:`otface.registry.LOSSES`.

The only collectives are Partial FC's, which every rank makes on every step: the OT term
makes none, whatever each rank mined.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from otface.criterion import LossOutput, MarginCriterion
from otface.hard_triplet_ot import MODES, VARIANTS, OTLossOutput, hard_triplet_ot_loss
from otface.ot import DISTANCES
from otface.registry import HOOKS, LOSSES

__all__ = [
    "MODES",
    "VARIANTS",
    "OTLossOutput",
    "OTFaceCriterion",
    "hard_triplet_ot_loss",
    "lambda_at",
]


def lambda_at(step: int, *, lambda_ot: float, warmup_steps: int) -> float:
    """``lambda_ot * min(1, step / warmup_steps)``; ``lambda_ot`` when ``warmup_steps <= 0``."""
    if warmup_steps <= 0:
        return float(lambda_ot)
    return float(lambda_ot) * min(1.0, max(0, step) / warmup_steps)


def _fixed_shapes(setting, device: torch.device) -> bool:
    # "auto": on CUDA, where a data-dependent shape stalls the host until the GPU catches up;
    # on the CPU there is nothing to stall, and solving only the hard triplets is cheaper.
    return device.type == "cuda" if setting == "auto" else bool(setting)


class OTFaceCriterion(MarginCriterion):
    """Margin softmax (Partial FC, as ``"arcface"``) plus ``lambda(step) * L_OT``.

    ``forward``'s ``step`` counts batches; lambda's warm-up counts optimiser steps
    (``ceil(step / gradient_acc)``).

    Subclasses :class:`otface.criterion.MarginCriterion`, so the class centres live in
    ``self.partial_fc`` exactly as for ``"arcface"`` and checkpoints are interchangeable. The
    feature hook (``HOOKS["hard_triplet"]``) is a plain attribute, not a submodule: it adds
    nothing to any ``state_dict``.

    Args:
        cfg: the job config (uses the ``otface`` section and the Partial-FC keys).
        backbone: the (unwrapped or DDP-wrapped) backbone whose feature map is hooked.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, cfg, *, backbone: nn.Module, rank: int, world_size: int) -> None:
        super().__init__(cfg, rank=rank, world_size=world_size)
        o = cfg.otface
        if o.mode not in MODES:
            raise ValueError(f"config otface.mode must be one of {MODES}, got {o.mode!r}")
        if o.variant not in VARIANTS:
            raise ValueError(f"config otface.variant must be one of {VARIANTS}, got {o.variant!r}")
        if o.distance not in DISTANCES:
            raise ValueError(
                f"config otface.distance must be one of {DISTANCES}, got {o.distance!r}"
            )
        self.ot_cfg = dict(o)
        # The warm-up of lambda counts optimiser steps: with gradient accumulation, batch
        # number `step` (1-based) belongs to optimiser step ceil(step / gradient_acc).
        self.batches_per_update = max(1, int(cfg.get("gradient_acc", 1)))
        self.capture = HOOKS.build("hard_triplet", backbone, layer=o.layer)
        self._warned_no_grad = False
        # lambda(step) lives on the device, filled by prepare_step before the forward, so that a
        # forward recorded in a CUDA graph (otface.train.graph) follows the warm-up on replay.
        self.register_buffer("_lambda", torch.zeros(()), persistent=False)

    def prepare_step(self, step: int) -> None:
        """Set lambda for batch ``step`` (1-based); a ``forward(..., step=None)`` then uses it."""
        update = -(-int(step) // self.batches_per_update)
        o = self.ot_cfg
        self._lambda.fill_(
            lambda_at(update, lambda_ot=o["lambda_ot"], warmup_steps=o["warmup_steps"])
        )

    def remove_hook(self) -> None:
        """Detach the feature hook from the backbone."""
        self.capture.remove()

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, *, step: int | None
    ) -> LossOutput:
        """``step`` (1-based batch number) sets lambda; ``None`` keeps the one
        :meth:`prepare_step` set."""
        if step is not None:
            self.prepare_step(step)
        margin = super().forward(embeddings, labels, step=step)
        features = self.capture.pop()
        if features is None:
            raise RuntimeError(
                f"OTFace: the hook on backbone module {self.capture.layer!r} captured nothing; "
                "call the backbone on this batch before the criterion"
            )
        if embeddings.requires_grad and not features.requires_grad and not self._warned_no_grad:
            self._warned_no_grad = True
            warnings.warn(
                f"OTFace: the feature map of {self.capture.layer!r} has no gradient (reentrant "
                "gradient checkpointing?); the OT term will not train the backbone (warned once)",
                RuntimeWarning,
                stacklevel=2,
            )
        o = self.ot_cfg
        # A ViT's mask tokens (training with token masking) are no support points.
        point_mask = self.capture.point_mask(features)
        ot = hard_triplet_ot_loss(
            features,
            embeddings,
            labels,
            mode=o["mode"],
            variant=o["variant"],
            ot_margin=o["ot_margin"],
            mining_margin=o["mining_margin"],
            max_triplets=o["max_triplets"],
            eps=o["epsilon"],
            max_iter=o["max_iter"],
            tol=o["tol"],
            solver=o["solver"],
            distance=o["distance"],
            kernel=o.get("kernel", "auto"),
            fixed_shapes=_fixed_shapes(o.get("fixed_shapes", "auto"), features.device),
            eps_scaling=o.get("eps_scaling", 0.0),
            relaxation=o.get("relaxation", 1.0),
            point_mask=point_mask,
        )
        lam = self._lambda.to(margin.loss.dtype)
        weighted = lam * ot.loss.to(margin.loss.dtype)
        loss = margin.loss + weighted
        metrics = dict(margin.metrics)
        metrics.update(ot.metrics)
        metrics["lambda_ot"] = lam.detach().clone()
        terms = {"margin": margin.loss, "ot": weighted, "features": features}
        return LossOutput(loss, metrics, terms)


@LOSSES.register("otface")
def _build_otface(cfg, *, backbone: nn.Module, rank: int, world_size: int) -> nn.Module:
    return OTFaceCriterion(cfg, backbone=backbone, rank=rank, world_size=world_size)
