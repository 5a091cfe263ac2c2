"""The optimiser side of a training step: SGD/AdamW over the backbone and the Partial-FC
centres, the fp16 loss scaler, and the clipped optimiser step that a non-finite gradient skips
without a trace."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from otface.train.guard import BufferSnapshot, SkipCounter

__all__ = ["GRAD_CLIP_NORM", "build_grad_scaler", "build_optimizer", "optimizer_step"]

GRAD_CLIP_NORM = 5.0


def build_optimizer(cfg, backbone: nn.Module, criterion: nn.Module) -> torch.optim.Optimizer:
    """The config's optimiser (``sgd`` or ``adamw``) over the backbone's parameters and the
    criterion's trainable ones."""
    # Partial FC's class centres form the last parameter group, as in arcface_torch.
    groups = [{"params": list(backbone.parameters())}]
    mult = float(cfg.get("backbone_lr_mult", 1.0))
    if mult != 1.0:  # config backbone_lr_mult (fine-tuning): the centres keep cfg.lr
        groups[0]["lr"] = cfg.lr * mult
    fc_params = [p for p in criterion.parameters() if p.requires_grad]
    if fc_params:
        groups.append({"params": fc_params})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_grad_scaler(device_type: str, *, distributed: bool) -> torch.amp.GradScaler:
    """fp16 loss scaler (growth every 100 clean steps, as arcface_torch).

    With a process group the Partial-FC centres are sharded: their gradients are never
    all-reduced, so an Inf/NaN there is seen by one rank only. A plain ``GradScaler`` would then
    skip the step (backbone included) on that rank alone and the DDP replicas would silently
    drift apart, with different loss scales. ``ShardedGradScaler`` all-reduces the found-Inf
    flag in ``unscale_`` (on the device stream, no host sync), so every rank skips together.
    """
    if distributed:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device_type, growth_interval=100)
    if not hasattr(torch.amp, "GradScaler"):  # torch < 2.3 (requirements allow 2.1)
        return torch.cuda.amp.GradScaler(growth_interval=100)
    return torch.amp.GradScaler(device_type, growth_interval=100)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    backbone: nn.Module,
    *,
    grad_scaler: torch.amp.GradScaler | None,
    buffers: BufferSnapshot,
    skips: SkipCounter,
    global_step: int,
    keep_grads: bool = False,
) -> bool:
    """Clip, check and apply the accumulated gradients; ``False`` when skipped.

    The backbone's gradients are clipped to a norm of :data:`GRAD_CLIP_NORM`. A non-finite norm
    (or the scaler's Inf flag, or a BatchNorm buffer the forward made non-finite) skips the
    step: the weights and optimiser state stay, ``buffers`` puts back the BatchNorm statistics
    the forward wrote, and ``skips`` counts it (raising
    :class:`~otface.train.guard.TooManySkippedSteps` past its limit). The gradients are set to
    ``None`` either way, unless ``keep_grads`` (a CUDA graph owns them and overwrites them on
    its next replay: :mod:`otface.train.graph`). ``global_step`` names the step in the warning.
    """
    if grad_scaler is not None:
        grad_scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(backbone.parameters(), GRAD_CLIP_NORM)
    ok = torch.isfinite(grad_norm)
    # A forward can push BatchNorm's running statistics to Inf while the loss and the
    # gradients stay finite (a huge learning rate): such a step is skipped too, and its
    # statistics restored, or every later step is NaN and the saved model useless.
    buffers_ok = buffers.finite()
    if buffers_ok is not None:
        ok = ok & buffers_ok.to(ok.device)
    found_inf = _found_inf(grad_scaler, optimizer)
    if found_inf is not None:
        # The scaler's Inf flag (class centres included; all-reduced by ShardedGradScaler,
        # so ranks agree) joins the decision, and optimizer.step() is called here rather
        # than through scaler.step(), which would read that flag on the host once more.
        ok = ok & (found_inf.to(ok.device) == 0)
    # The one host read of the step. The backbone's gradients are all-reduced, so every
    # rank decides the same.
    finite = bool(ok)
    if finite:
        if grad_scaler is not None and found_inf is None:
            grad_scaler.step(optimizer)
        else:
            optimizer.step()
    else:
        # A NaN/Inf batch must not poison the model: weights and optimiser state stay (no
        # step), and the BatchNorm statistics its forward wrote are put back.
        buffers.restore()
        last = skips.max_consecutive and skips.consecutive + 1 >= skips.max_consecutive
        if skips.total == 0 or (skips.total + 1) % 100 == 0 or last:
            norm = float(grad_norm)
            why = f"non-finite gradient norm ({norm})"
            if math.isfinite(norm) and buffers_ok is not None and not bool(buffers_ok):
                why = "non-finite BatchNorm running statistics after the forward"
            elif grad_scaler is not None:
                # Normal at the start of fp16 training, while the scaler calibrates.
                why = (
                    f"fp16 gradients overflowed at loss scale "
                    f"{grad_scaler.get_scale():g}, which is now lowered"
                )
            logging.warning(
                "step %d: %s; optimiser step skipped and BatchNorm statistics restored "
                "(%d skipped so far)",
                global_step,
                why,
                skips.total + 1,
            )
    if grad_scaler is not None:
        grad_scaler.update()
    if not keep_grads:
        optimizer.zero_grad(set_to_none=True)
    skips.record(skipped=not finite, global_step=global_step)
    return finite


def _found_inf(scaler, optimizer) -> torch.Tensor | None:
    """The Inf/NaN flag ``scaler.unscale_(optimizer)`` left on the device (> 0: skip), or None
    without a scaler, or where this torch keeps it elsewhere (then scaler.step() decides)."""
    if scaler is None or not scaler.is_enabled():
        return None
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
    flags = list(state.get("found_inf_per_device", {}).values())
    if not flags:
        return None
    return (
        flags[0] if len(flags) == 1 else torch.stack([f.to(flags[0].device) for f in flags]).sum()
    )
