"""How much of the update the OT term makes: its gradient beside the margin loss's.

On log steps only, before the step's backward, the two terms of OTFace's loss are
differentiated separately (``torch.autograd.grad``, which leaves ``.grad`` alone):

* ``ot_grad_share_layer``: ``||d(lambda L_OT)/dF|| / ||dL_margin/dF||`` at the hooked feature
  map ``F``: what each term sends into the layer the OT term reads;
* ``ot_grad_share``: the same ratio over all the backbone's parameters (the OT term's gradient
  reaches only the layers below ``F``; the margin loss's reaches all of them).

Both use the weighted OT term, so they say how large the OT part of the actual update is. The
two extra backward passes cost about one step on each log step; every rank computes them
(the margin loss's backward crosses Partial FC's collectives).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["gradient_shares"]


def _norm(grads: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    parts = [g.float().pow(2).sum() for g in grads if g is not None]
    if not parts:
        return torch.zeros(())
    return torch.stack(parts).sum().sqrt()


def gradient_shares(
    terms: dict,
    params: Sequence[torch.nn.Parameter],
    *,
    scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """``ot_grad_share`` and ``ot_grad_share_layer`` of one step (0-d tensors; empty when the
    OT term has no gradient path).

    Args:
        terms: the criterion's ``LossOutput.terms``: ``"margin"`` (the margin loss),
            ``"ot"`` (lambda times the OT loss) and ``"features"`` (the hooked map).
        params: the backbone's trainable parameters.
        scale: the fp16 grad scaler's ``scale`` (both terms are scaled before differentiating,
            as the step's backward is, so that fp16 gradients do not underflow; the scale
            cancels in the ratios).
    """
    margin, ot, features = terms["margin"], terms["ot"], terms["features"]
    if not (ot.requires_grad and margin.requires_grad and features.requires_grad):
        return {}
    if scale is not None:
        margin, ot = scale(margin), scale(ot)
    params = [p for p in params if p.requires_grad]
    inputs = [features, *params]
    g_margin = torch.autograd.grad(margin, inputs, retain_graph=True, allow_unused=True)
    g_ot = torch.autograd.grad(ot, inputs, retain_graph=True, allow_unused=True)
    tiny = torch.finfo(torch.float32).tiny
    layer = _norm(g_ot[:1]) / _norm(g_margin[:1]).clamp(min=tiny)
    whole = _norm(g_ot[1:]) / _norm(g_margin[1:]).clamp(min=tiny)
    device = features.device
    return {
        "ot_grad_share": whole.detach().to(device),
        "ot_grad_share_layer": layer.detach().to(device),
    }
