"""How much of the update the OT term makes: its gradient beside the margin loss's.

On log steps only, the two terms of OTFace's loss are compared:

* ``ot_grad_share_layer``: ``||d(lambda L_OT)/dF|| / ||dL_margin/dF||`` at the hooked feature
  map ``F``: what each term sends into the layer the OT term reads;
* ``ot_grad_share``: the same ratio over all the backbone's parameters (the OT term's gradient
  reaches only the layers below ``F``; the margin loss's reaches all of them).

Both use the weighted OT term, so they say how large the OT part of the actual update is.

The cost is one extra backward pass, of the OT term alone (``torch.autograd.grad``, which
leaves ``.grad`` alone), on each log step. The margin loss's gradient is not taken on its own:
gradients are linear, so it is the step's own gradient minus the OT term's, read by hooks on
``F`` and on each parameter as the step's backward passes them (the local gradients, before
DDP averages them or accumulation adds them up). Every rank measures its own batch.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["GradientShareProbe"]


def _sq(grad: torch.Tensor) -> torch.Tensor:
    return grad.float().pow(2).sum()


class GradientShareProbe:
    """``ot_grad_share`` and ``ot_grad_share_layer`` of one step, around its backward.

    Made after the forward, before the backward: it takes the OT term's gradient and hooks
    ``F`` and the parameters. :meth:`finish` after the backward removes the hooks and returns
    the two shares (0-d tensors; empty when the OT term has no gradient path).

    Args:
        terms: the criterion's ``LossOutput.terms``: ``"margin"`` (the margin loss),
            ``"ot"`` (lambda times the OT loss) and ``"features"`` (the hooked map). The
            step's loss is ``margin + ot``.
        params: the backbone's trainable parameters.
        scale: what the step's backward scales the loss by before differentiating (the fp16
            grad scaler's ``scale``, a division by ``gradient_acc``): the OT term is scaled
            the same, so that the two gradients subtract; the scale cancels in the ratios.
    """

    def __init__(
        self,
        terms: dict,
        params: Sequence[torch.nn.Parameter],
        *,
        scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        margin, ot, features = terms["margin"], terms["ot"], terms["features"]
        self._handles: list = []
        self._margin_sq: list[torch.Tensor] = []
        self._margin_layer: Optional[torch.Tensor] = None
        self.active = bool(ot.requires_grad and margin.requires_grad and features.requires_grad)
        if not self.active:
            return
        if scale is not None:
            ot = scale(ot)
        params = [p for p in params if p.requires_grad]
        g_ot = torch.autograd.grad(ot, [features, *params], retain_graph=True, allow_unused=True)
        self._device = features.device
        self._ot_layer = g_ot[0] if g_ot[0] is not None else torch.zeros_like(features)
        parts = [_sq(g) for g in g_ot[1:] if g is not None]
        self._ot_sq = torch.stack(parts).sum() if parts else torch.zeros((), device=self._device)
        self._handles.append(features.register_hook(self._on_features))
        for p, g in zip(params, g_ot[1:]):
            self._handles.append(p.register_hook(self._param_hook(g)))

    def _on_features(self, grad: torch.Tensor) -> None:
        self._margin_layer = (grad - self._ot_layer).float().norm()

    def _param_hook(self, ot_grad: Optional[torch.Tensor]):
        def hook(grad: torch.Tensor) -> None:
            self._margin_sq.append(_sq(grad if ot_grad is None else grad - ot_grad))

        return hook

    def remove(self) -> None:
        """Removes the hooks (idempotent): after a backward that failed, or by :meth:`finish`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def finish(self) -> dict[str, torch.Tensor]:
        """The two shares of the backward that ran since this probe was made."""
        self.remove()
        if not self.active or self._margin_layer is None:
            return {}
        tiny = torch.finfo(torch.float32).tiny
        margin_sq = torch.stack(self._margin_sq).sum() if self._margin_sq else None
        layer = self._ot_layer.float().norm() / self._margin_layer.clamp(min=tiny)
        if margin_sq is None:
            whole = torch.zeros((), device=self._device)
        else:
            whole = self._ot_sq.sqrt() / margin_sq.sqrt().clamp(min=tiny)
        return {
            "ot_grad_share": whole.detach().to(self._device),
            "ot_grad_share_layer": layer.detach().to(self._device),
        }
