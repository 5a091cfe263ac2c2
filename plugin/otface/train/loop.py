"""arcface_torch's ``train_v2`` flow: DDP backbone, Partial-FC criterion, polynomial LR,
fp16 AMP, gradient accumulation, atomic checkpoints and resume."""

from __future__ import annotations

import difflib
import logging
import os
import random
import sys
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from otface.config import ConfigError, load_config
from otface.criterion import LossOutput
from otface.data.datasets import normalize_images
from otface.registry import LOSSES
from otface.train.checkpoint import (
    atomic_save,
    checkpoint_path,
    load_checkpoint,
    model_path,
)
from otface.train.distributed import DistEnv, init_distributed, shutdown_distributed
from otface.train.log import StepLogger, init_logging
from otface.train.lr import build_lr_scheduler

__all__ = ["Trainer", "build_backbone", "build_grad_scaler", "main", "seed_everything"]

GRAD_CLIP_NORM = 5.0

BackboneFactory = Callable[[Any, torch.device], nn.Module]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) the same way on every rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_backbone(cfg, device: torch.device) -> nn.Module:
    """The config's network; an unknown name is a :class:`ConfigError`."""
    from otface.backbones import get_model, list_models

    names = list_models()
    if cfg.network not in names:
        close = difflib.get_close_matches(cfg.network, names, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ConfigError(
            f"key 'network' = {cfg.network!r} is not a known backbone; {hint}"
            f"valid: {', '.join(names)}"
        )
    fp16 = bool(cfg.fp16) and device.type == "cuda"
    model = get_model(cfg.network, dropout=0.0, fp16=fp16, num_features=cfg.embedding_size)
    return model.to(device)


def _build_optimizer(cfg, backbone: nn.Module, criterion: nn.Module) -> torch.optim.Optimizer:
    # Partial FC's class centres form the last parameter group, as in arcface_torch.
    groups = [{"params": list(backbone.parameters())}]
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


class Trainer:
    """One rank's model, criterion, optimiser and schedule.

    Args:
        cfg: a validated config (:func:`otface.config.load_config`).
        env: this process's ranks and device.
        backbone_factory: ``factory(cfg, device) -> nn.Module`` building the network; by
            default :func:`build_backbone` (this package's backbones).
    """

    def __init__(
        self, cfg, env: DistEnv, *, backbone_factory: BackboneFactory | None = None
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.device = env.device
        self.backbone = (backbone_factory or build_backbone)(cfg, self.device)
        try:
            builder = LOSSES.get(cfg.loss)
        except KeyError as err:
            raise ConfigError(f"key 'loss': {err.args[0]}") from None
        self.criterion = builder(
            cfg, backbone=self.backbone, rank=env.rank, world_size=env.world_size
        ).to(self.device)
        self.model: nn.Module = self.backbone
        if env.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.backbone,
                broadcast_buffers=False,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                bucket_cap_mb=16,
                find_unused_parameters=True,
            )
            if self.device.type == "cuda":
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
                    fp16_compress_hook,
                )

                self.model.register_comm_hook(None, fp16_compress_hook)
            self.model._set_static_graph()
        self.optimizer = _build_optimizer(cfg, self.backbone, self.criterion)
        self.total_batch_size = cfg.batch_size * env.world_size
        self.steps_per_epoch = cfg.num_image // self.total_batch_size
        self.warmup_step = int(self.steps_per_epoch * cfg.warmup_epoch)
        self.total_step = self.steps_per_epoch * cfg.num_epoch
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, warmup_steps=self.warmup_step, total_steps=self.total_step
        )
        self.use_amp = bool(cfg.fp16) and self.device.type == "cuda"
        if cfg.fp16 and not self.use_amp:
            warnings.warn("fp16 = True needs CUDA; training in fp32 on the CPU", stacklevel=2)
        self.grad_scaler = (
            build_grad_scaler(self.device.type, distributed=env.distributed)
            if self.use_amp
            else None
        )
        self.global_step = 0
        self.skipped_steps = 0  # optimiser steps skipped for a non-finite gradient (fp32)
        self.start_epoch = 0
        self.start_batch = 0

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, img: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """Forward, backward and (every ``gradient_acc`` batches) an optimiser step.

        ``img`` is float32 in ``[-1, 1]`` or ``uint8`` pixels (normalised on the device).

        ``self.global_step`` counts batches; it is advanced here, before the forward.
        """
        self.global_step += 1
        cfg = self.cfg
        img = img.to(self.device, non_blocking=True)
        if img.dtype == torch.uint8:
            # The loader hands uint8 batches to CUDA runs (pinned, 4x fewer bytes to copy);
            # they are normalised here, on the device.
            img = normalize_images(img)
        labels = labels.to(self.device, non_blocking=True)
        embeddings = self.model(img)
        out = self.criterion(embeddings, labels, step=self.global_step)
        loss = out.loss / cfg.gradient_acc if cfg.gradient_acc > 1 else out.loss
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.global_step % cfg.gradient_acc == 0:
            if self.grad_scaler is not None:
                self.grad_scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.backbone.parameters(), GRAD_CLIP_NORM)
            if self.grad_scaler is not None:
                # The scaler skips steps with Inf/NaN gradients and lowers its scale.
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
            elif torch.isfinite(grad_norm):
                self.optimizer.step()
            else:
                # A NaN/Inf batch must not poison the weights (fp32 has no grad scaler to
                # catch it). The backbone's gradients are all-reduced, so every rank decides
                # the same.
                self.skipped_steps += 1
                if self.skipped_steps == 1 or self.skipped_steps % 100 == 0:
                    logging.warning(
                        "step %d: non-finite gradient norm, optimiser step skipped (%d so far)",
                        self.global_step,
                        self.skipped_steps,
                    )
            self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        metrics = dict(out.metrics)
        metrics["loss"] = out.loss.detach()
        return LossOutput(out.loss, metrics)

    @property
    def lr(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self, *, epoch: int, epoch_step: int) -> dict:
        return {
            "epoch": epoch,
            "epoch_step": epoch_step,
            "global_step": self.global_step,
            "state_dict_backbone": self.backbone.state_dict(),
            "state_dict_softmax_fc": self.criterion.partial_fc.state_dict(),
            "state_optimizer": self.optimizer.state_dict(),
            "state_lr_scheduler": self.lr_scheduler.state_dict(),
            "state_grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler else None,
        }

    def save_state(self, *, epoch: int, epoch_step: int) -> str:
        path = checkpoint_path(self.cfg.output, self.env.rank)
        atomic_save(self.state(epoch=epoch, epoch_step=epoch_step), path)
        return path

    def save_model(self) -> str:
        path = model_path(self.cfg.output)
        atomic_save(self.backbone.state_dict(), path)
        return path

    def resume(self) -> None:
        """Load ``checkpoint_gpu_{rank}.pt``; training continues after its ``global_step``."""
        path = checkpoint_path(self.cfg.output, self.env.rank)
        ckpt = load_checkpoint(path, map_location=self.device)
        self.backbone.load_state_dict(ckpt["state_dict_backbone"])
        self.criterion.partial_fc.load_state_dict(ckpt["state_dict_softmax_fc"])
        self.optimizer.load_state_dict(ckpt["state_optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["state_lr_scheduler"])
        if self.grad_scaler is not None and ckpt.get("state_grad_scaler"):
            self.grad_scaler.load_state_dict(ckpt["state_grad_scaler"])
        self.global_step = int(ckpt["global_step"])
        self.start_epoch = int(ckpt["epoch"])
        self.start_batch = int(ckpt.get("epoch_step", 0))
        if self.start_batch >= self.steps_per_epoch:
            self.start_epoch, self.start_batch = self.start_epoch + 1, 0
        logging.info(
            "resumed from %s: epoch %d, batch %d of the epoch, global step %d, learning rate %.6f",
            path,
            self.start_epoch,
            self.start_batch,
            self.global_step,
            self.lr,
        )


def _check_data(cfg, rec_path: str) -> None:
    from otface.data import check_dataset_config, dataset_info

    try:
        check_dataset_config(cfg, dataset_info(rec_path))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _log_config(cfg) -> None:
    for key, value in cfg.items():
        logging.info(": %s%s", key.ljust(25), value)


def fit(cfg, env: DistEnv, *, backbone_factory: BackboneFactory | None = None) -> Trainer:
    """Run the whole training job of ``cfg`` on this rank.

    ``backbone_factory(cfg, device)`` builds the network (default :func:`build_backbone`).
    """
    from otface.data import build_train_loader, prepare_rec

    seed_everything(cfg.seed)
    rec_path = prepare_rec(cfg.rec)
    _check_data(cfg, rec_path)
    cfg.rec = rec_path
    trainer = Trainer(cfg, env, backbone_factory=backbone_factory)
    if cfg.resume:
        trainer.resume()
    # On CUDA the loader's uint8 batches stay pinned and are normalised on the GPU in
    # train_step; normalising them on the host would hand out unpinned float32 batches
    # (4x the bytes, a synchronous copy) and cost the main process CPU time every step.
    loader = build_train_loader(
        cfg, rank=env.rank, world_size=env.world_size, normalize=env.device.type != "cuda"
    )

    writer = None
    verification = None
    if env.rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=os.path.join(cfg.output, "tensorboard"))
        _log_config(cfg)
        if os.path.isdir(rec_path) and cfg.val_targets:
            from otface.evaluation import VerificationCallback

            verification = VerificationCallback(
                list(cfg.val_targets), rec_path, summary_writer=writer
            )
    step_logger = StepLogger(
        frequent=cfg.frequent,
        total_step=trainer.total_step,
        batch_size=cfg.batch_size,
        world_size=env.world_size,
        start_step=trainer.global_step,
        writer=writer,
    )

    def verify() -> None:
        if verification is not None:
            verification(trainer.global_step, trainer.backbone)

    trainer.backbone.train()
    try:
        for epoch in range(trainer.start_epoch, cfg.num_epoch):
            first = trainer.start_batch if epoch == trainer.start_epoch else 0
            loader.batch_sampler.set_epoch(epoch, start_batch=first)
            for batch_idx, (img, labels) in enumerate(loader, start=first):
                out = trainer.train_step(img, labels)
                step = trainer.global_step
                # get_scale() copies the scale to the host (a device sync): read it only on
                # the steps that write a log line.
                log_scale = trainer.grad_scaler is not None and step % cfg.frequent == 0
                step_logger(
                    step,
                    out.metrics,
                    epoch=epoch,
                    lr=trainer.lr,
                    grad_scale=trainer.grad_scaler.get_scale() if log_scale else None,
                )
                if step % cfg.verbose == 0:
                    verify()
                if (
                    cfg.save_every_steps
                    and step % cfg.save_every_steps == 0
                    and step % cfg.gradient_acc == 0
                    and batch_idx + 1 < trainer.steps_per_epoch
                ):
                    trainer.save_state(epoch=epoch, epoch_step=batch_idx + 1)
            if cfg.save_all_states or cfg.save_every_steps:
                trainer.save_state(epoch=epoch + 1, epoch_step=0)
            if env.rank == 0:
                trainer.save_model()
        if env.rank == 0:
            if trainer.global_step % cfg.verbose != 0:
                verify()
            trainer.save_model()
            logging.info(
                "finished: %d steps, model saved to %s", trainer.global_step, model_path(cfg.output)
            )
    finally:
        if writer is not None:
            writer.close()
    return trainer


def main(
    config_path: str,
    *,
    load: Callable[[str], Any] = load_config,
    backbone_factory: BackboneFactory | None = None,
) -> int:
    """Command-line entry: load the config, join the process group, train. Returns exit code.

    ``load`` reads and validates the config (default :func:`otface.config.load_config`);
    ``backbone_factory`` is passed to :func:`fit`.
    """
    try:
        cfg = load(config_path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    env = init_distributed()
    try:
        os.makedirs(cfg.output, exist_ok=True)
        init_logging(env.rank, cfg.output)
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        fit(cfg, env, backbone_factory=backbone_factory)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.warning("interrupted; the last complete checkpoint in %s is intact", cfg.output)
        return 130
    finally:
        shutdown_distributed()
    return 0
