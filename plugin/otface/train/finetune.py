"""Fine-tuning: start a new run from another run's weights, and hold part of the network fixed
for a while.

Config keys (``configs/base.py``):

- ``init_backbone``: the backbone's weights from a file: this trainer's or arcface_torch's
  ``model.pt``, a model-zoo ``backbone.pth`` (a bare state_dict, ``module.`` prefixes allowed),
  a ``checkpoint_gpu_{rank}.pt`` or a merged ``full_state.pt`` (their ``state_dict_backbone``).
  Only the weights: unlike ``resume``, the step, the schedule, the optimiser state and the RNG
  start fresh. A file written for another network is one error naming the file, the network
  it looks like and the first key that differs.
- ``init_centres``: Partial FC's class centres from a ``full_state.pt`` (``python -m
  otface.full_state merge``) of a run with the same classes; each rank takes its shard of them
  (:func:`otface.partial_fc.shard_range`), so any number of ranks can start from it.
- ``freeze_steps``, ``freeze_stages``, ``freeze_bn``: for the first ``freeze_steps`` steps (a
  number below 1 is that fraction of the run's steps, rounded, at least 1) the frozen part keeps
  its weights exactly (its gradients are computed, as DDP needs one fixed set of parameters, and
  dropped before the optimiser step: no update, no weight decay, no momentum) and, with
  ``freeze_bn``, its BatchNorm runs in eval mode (running statistics kept).
- ``backbone_lr_mult`` is applied where the optimiser is built (:mod:`otface.train.optim`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from otface.backbones.guess import guess_network
from otface.config import ConfigError
from otface.evaluation.models import clean_backbone_state, state_differences, state_shapes

__all__ = [
    "Freezer",
    "guess_network",
    "load_init_backbone",
    "load_init_centres",
    "read_backbone_file",
]


def _read(path: str, key: str) -> Any:
    """``torch.load`` of a file named by config ``key``: checked against its ``.sha256``
    sidecar when it has one (this trainer's checkpoints), else loaded as weights only."""
    from otface.train.integrity import CheckpointError, checksum_path, load_verified

    if not os.path.isfile(path):
        what = "a folder" if os.path.isdir(path) else "no such file"
        raise ConfigError(f"key '{key}' = {path!r}: {what} (expected a .pt/.pth file)")
    if os.path.getsize(path) == 0:
        raise ConfigError(f"key '{key}' = {path!r}: the file is empty (0 bytes)")
    if os.path.isfile(checksum_path(path)):
        try:
            return load_verified(path, map_location="cpu")
        except CheckpointError as err:
            raise ConfigError(f"key '{key}': {err}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors come in many types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"key '{key}' = {path!r}: cannot be read as a PyTorch state_dict or checkpoint "
            f"({type(err).__name__}: {reason})"
        ) from None


def read_backbone_file(path: str, key: str = "init_backbone") -> tuple[dict, str]:
    """The backbone state_dict held by ``path`` and what kind of file it was.

    Raises:
        ConfigError: missing, unreadable, no backbone in it, or NaN/Inf in it (names the file).
    """
    obj = _read(path, key)
    if not isinstance(obj, dict):
        raise ConfigError(
            f"key '{key}' = {path!r}: holds a {type(obj).__name__}, not a state_dict or checkpoint"
        )
    if "state_dict_backbone" in obj:
        state = obj["state_dict_backbone"]
        step = obj.get("global_step")
        kind = "full_state.pt" if "full_state" in obj else "training checkpoint"
        if step is not None:
            kind += f" at global step {int(step)}"
    else:
        state, kind = obj, "state_dict"
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"key '{key}' = {path!r}: holds no backbone weights")
    try:
        state = clean_backbone_state(state, f"key '{key}' = {path!r}")
    except ValueError as exc:  # an entry that is not a tensor, or NaN / Inf
        raise ConfigError(str(exc)) from None
    return state, kind


def load_init_backbone(cfg, backbone: nn.Module) -> str:
    """Load ``cfg.init_backbone`` into ``backbone`` strictly; returns a line for the log.

    Raises:
        ConfigError: one line naming the file, the network it looks like and the first key
            that differs, when it was written for another network.
    """
    path = str(cfg.init_backbone)
    state, kind = read_backbone_file(path)
    found = state_shapes(state)
    diffs = state_differences(state_shapes(backbone), found)
    if diffs:
        looks = guess_network(state)
        if looks is None:
            like = "it matches none of this project's networks"
        elif looks.startswith("nearest: "):
            like = f"it is closest to network {looks[len('nearest: ') :]!r}, but not equal"
        else:
            like = f"it looks like network {looks!r}"
            if "features.weight" in found:
                like += f" with embedding_size {found['features.weight'][0]}"
        raise ConfigError(
            f"key 'init_backbone' = {path!r} does not fit network {cfg.network!r} "
            f"(embedding_size {cfg.embedding_size}): {like}; first difference: "
            f"{diffs[0]}"
        )
    with torch.no_grad():
        backbone.load_state_dict(state, strict=True)
    return (
        f"init_backbone: {cfg.network} weights from {path} ({kind}); the step, the schedule, "
        "the optimiser state and the RNG start fresh"
    )


def load_init_centres(cfg, partial_fc: nn.Module, *, rank: int, world_size: int) -> str:
    """Copy this rank's shard of ``cfg.init_centres``'s class centres into ``partial_fc``;
    returns a line for the log.

    Raises:
        ConfigError: the file holds no class centres, or another number of classes or
            embedding size than this run (names the file and both values).
    """
    from otface.partial_fc import shard_range

    path = str(cfg.init_centres)
    obj = _read(path, "init_centres")
    fc = obj.get("state_dict_softmax_fc") if isinstance(obj, dict) else None
    weight = fc.get("weight") if isinstance(fc, dict) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ConfigError(
            f"key 'init_centres' = {path!r}: holds no class centres (key "
            "'state_dict_softmax_fc.weight'); pass a full_state.pt made by "
            "python -m otface.full_state merge OUTPUT"
        )
    rows, dim = weight.shape
    if rows != int(cfg.num_classes):
        hint = (
            " (a checkpoint_gpu_*.pt of a run on several ranks holds one rank's shard: merge "
            "them with python -m otface.full_state merge OUTPUT)"
            if "full_state" not in obj
            else ""
        )
        raise ConfigError(
            f"key 'init_centres' = {path!r} holds {rows} class centres, but num_classes = "
            f"{cfg.num_classes}: the centres need the same class set{hint}"
        )
    if dim != int(cfg.embedding_size):
        raise ConfigError(
            f"key 'init_centres' = {path!r}: its centres have {dim} dimensions, but "
            f"embedding_size = {cfg.embedding_size}"
        )
    if not torch.isfinite(weight).all():
        raise ConfigError(f"key 'init_centres' = {path!r}: the class centres hold NaN or Inf")
    start, count = shard_range(rows, rank=rank, world_size=world_size)
    target = partial_fc.weight
    if tuple(target.shape) != (count, dim):
        raise ConfigError(
            f"key 'init_centres' = {path!r}: rank {rank} holds {tuple(target.shape)} class "
            f"centres, the file's shard for it is {(count, dim)}"
        )
    with torch.no_grad():
        target.copy_(weight[start : start + count].to(target.dtype))
    return (
        f"init_centres: {rows} class centres from {path}, rows {start}..{start + count - 1} "
        f"on rank {rank} of {world_size}"
    )


def _frozen_modules(backbone: nn.Module, stages, network: str) -> list[nn.Module]:
    if stages == "all":
        return [backbone]
    names = [f"layer{i}" for i in range(1, 5)]
    if not all(hasattr(backbone, n) for n in names + ["conv1", "bn1", "prelu"]):
        raise ConfigError(
            f"key 'freeze_stages' = {stages!r}: network {network!r} has no IResNet stem and "
            "stages (layer1..layer4) to freeze; use freeze_stages = 'all'"
        )
    if stages > len(names):
        raise ConfigError(
            f"key 'freeze_stages' = {stages} is out of range; network {network!r} has "
            f"{len(names)} residual stages"
        )
    stem = [backbone.conv1, backbone.bn1, backbone.prelu]
    return stem + [getattr(backbone, n) for n in names[:stages]]


class Freezer:
    """Config ``freeze_steps`` / ``freeze_stages`` / ``freeze_bn`` for one trainer of
    ``total_steps`` steps."""

    def __init__(self, cfg, backbone: nn.Module, *, total_steps: int) -> None:
        steps = cfg.get("freeze_steps", 0)
        self.fraction = float(steps) if 0 < steps < 1 else None
        self.steps = max(1, round(steps * total_steps)) if self.fraction else int(steps)
        self.total_steps = total_steps
        self.stages = cfg.get("freeze_stages", "all")
        self.bn_eval = bool(cfg.get("freeze_bn", True))
        modules = _frozen_modules(backbone, self.stages, cfg.network) if self.steps else []
        self.params = [p for m in modules for p in m.parameters()]
        self.batch_norms = [
            m
            for root in modules
            for m in root.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self._was_frozen: bool | None = None

    @property
    def active(self) -> bool:
        return self.steps > 0

    def describe(self) -> str:
        what = (
            "the whole backbone"
            if self.stages == "all"
            else (
                f"the stem and the first {self.stages} residual stages"
                if self.stages
                else "the stem"
            )
        )
        bn = ", its BatchNorm in eval mode" if self.bn_eval else ""
        share = f" ({self.fraction:g} of {self.total_steps})" if self.fraction else ""
        return (
            f"freeze_steps: {what} ({sum(p.numel() for p in self.params):,} parameters{bn}) "
            f"held fixed for steps 1..{self.steps}{share}"
        )

    def frozen(self, step: int) -> bool:
        return 0 < step <= self.steps

    def before_forward(self, step: int, training: bool) -> None:
        """Put the frozen part's BatchNorm in eval mode while frozen (every step: an
        evaluation pass in between sets the whole backbone back to training mode)."""
        if not self.active:
            return
        frozen = self.frozen(step)
        if self.bn_eval and training:
            for bn in self.batch_norms:
                bn.train(not frozen)
        if self._was_frozen and not frozen:
            logging.info(
                "step %d: freeze_steps = %d ended; the whole backbone trains", step, self.steps
            )
        self._was_frozen = frozen

    def drop_gradients(self, step: int) -> None:
        """Before the optimiser step: no gradient, hence no update, for the frozen part."""
        if self.active and self.frozen(step):
            for p in self.params:
                p.grad = None
