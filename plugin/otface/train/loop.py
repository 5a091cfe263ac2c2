"""arcface_torch's ``train_v2`` flow: DDP backbone, Partial-FC criterion, polynomial LR,
fp16 AMP, gradient accumulation, atomic checkpoints and resume."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import random
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from otface.config import ConfigError
from otface.criterion import LossOutput
from otface.registry import LOSSES
from otface.train.checkpoint import (
    CheckpointError,
    atomic_save,
    load_latest_checkpoint,
    model_path,
    remove_stale_temp_files,
    save_checkpoint,
)
from otface.train.distributed import DistEnv
from otface.train.elastic import find_saved_runs, load_resharded, resume_position
from otface.train.guard import BufferSnapshot, SkipCounter
from otface.train.log import StepLogger
from otface.train.lr import ScheduleMap, build_lr_scheduler
from otface.train.prefetch import DevicePrefetcher, to_training_layout
from otface.train.rng import capture_rng_state, restore_rng_state
from otface.train.signals import RUN, signals_deferred

__all__ = [
    "Trainer",
    "build_backbone",
    "build_grad_scaler",
    "compile_backbone",
    "fit",
    "prepare_data",
    "seed_everything",
]

GRAD_CLIP_NORM = 5.0

BackboneFactory = Callable[[Any, torch.device], nn.Module]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) the same way on every rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _use_channels_last(setting, device: torch.device) -> bool:
    from otface.backbones import use_channels_last

    try:
        return use_channels_last(setting, device)
    except ValueError as err:
        raise ConfigError(f"key {err}") from None


def compile_backbone(backbone: nn.Module, setting) -> None:
    """``torch.compile`` the backbone in place (config ``compile``: False, True or a mode).

    In place (``Module.compile``), so the state_dict keys, the feature hook and DDP see the
    same module as without it.
    """
    if setting is False:
        return
    if not hasattr(backbone, "compile"):  # torch < 2.2 (requirements allow 2.1)
        raise ConfigError("key 'compile': needs torch >= 2.2 (nn.Module.compile)")
    backbone.compile(mode=None if setting is True else setting)


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
        # NHWC convolutions on CUDA (config.channels_last); the state_dict is unchanged.
        self.channels_last = _use_channels_last(cfg.get("channels_last", "auto"), self.device)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        compile_backbone(self.backbone, cfg.get("compile", False))
        try:
            builder = LOSSES.get(cfg.loss)
        except KeyError as err:
            raise ConfigError(f"key 'loss': {err.args[0]}") from None
        self.criterion = builder(
            cfg, backbone=self.backbone, rank=env.rank, world_size=env.world_size
        ).to(self.device)
        self.model: nn.Module = self.backbone
        if env.distributed:
            # A static graph finds parameters unused by the loss on its first step by itself.
            self.model = nn.parallel.DistributedDataParallel(
                self.backbone,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                bucket_cap_mb=16,
                **_rank_local_buffers(),
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
        self.schedule = ScheduleMap(self.warmup_step, self.total_step)
        self.schedule_batch_size = self.total_batch_size  # the global batch it is laid out for
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
        self.skips = SkipCounter(max_consecutive=cfg.get("max_consecutive_skips", 100))
        # BatchNorm statistics change in the forward, before a non-finite loss can be seen:
        # a skipped step restores them from this snapshot.
        self._buffers = BufferSnapshot(self.backbone)
        self.start_epoch = 0
        self.start_batch = 0
        self.last_checkpoint: str | None = None
        self._resumed_rng: dict | None = None
        self._synced_once = False

    @property
    def skipped_steps(self) -> int:
        """Optimiser steps skipped for a non-finite loss or gradient, in all."""
        return self.skips.total

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, img: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """Forward, backward and (every ``gradient_acc`` batches) an optimiser step.

        ``img`` is float32 in ``[-1, 1]`` or ``uint8`` pixels (normalised on the device).

        ``self.global_step`` counts batches; it is advanced here, before the forward. With
        gradient accumulation, DDP all-reduces only on the last batch of each accumulation.
        """
        self.global_step += 1
        cfg = self.cfg
        acc = cfg.gradient_acc
        if (self.global_step - 1) % acc == 0:  # first batch of an accumulation
            self._buffers.take()
        update = self.global_step % acc == 0
        # The loader hands uint8 batches to CUDA runs (pinned, 4x fewer bytes to copy); the
        # prefetcher has usually moved and normalised them already, and then this is a no-op.
        img, labels = to_training_layout(img, labels, self.device, channels_last=self.channels_last)
        # DDP's static graph records its first step with gradient hooks on: no_sync only after.
        no_sync = getattr(self.model, "no_sync", None) if self._synced_once else None
        with no_sync() if (no_sync is not None and not update) else contextlib.nullcontext():
            embeddings = self.model(img)
            out = self.criterion(embeddings, labels, step=self.global_step)
            loss = out.loss / acc if acc > 1 else out.loss
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss).backward()
            else:
                loss.backward()
        self._synced_once = self._synced_once or update
        skipped = update and not self._optimizer_step()
        with warnings.catch_warnings():
            if skipped or not update:
                # The schedule counts batches (as arcface_torch); torch warns when it moves on
                # without an optimiser step, which skips and accumulation do by design.
                warnings.simplefilter("ignore", UserWarning)
            self.lr_scheduler.step()
        metrics = dict(out.metrics)
        metrics["loss"] = out.loss.detach()
        return LossOutput(out.loss, metrics)

    def _optimizer_step(self) -> bool:
        """Clip, check and apply the accumulated gradients; ``False`` when skipped."""
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.backbone.parameters(), GRAD_CLIP_NORM)
        ok = torch.isfinite(grad_norm)
        found_inf = _found_inf(self.grad_scaler, self.optimizer)
        if found_inf is not None:
            # The scaler's Inf flag (class centres included; all-reduced by ShardedGradScaler,
            # so ranks agree) joins the decision, and optimizer.step() is called here rather
            # than through scaler.step(), which would read that flag on the host once more.
            ok = ok & (found_inf.to(ok.device) == 0)
        # The one host read of the step. The backbone's gradients are all-reduced, so every
        # rank decides the same.
        finite = bool(ok)
        if finite:
            if self.grad_scaler is not None and found_inf is None:
                self.grad_scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        else:
            # A NaN/Inf batch must not poison the model: weights and optimiser state stay (no
            # step), and the BatchNorm statistics its forward wrote are put back.
            self._buffers.restore()
            if self.skips.total == 0 or (self.skips.total + 1) % 100 == 0:
                why = f"non-finite gradient norm ({float(grad_norm)})"
                if self.grad_scaler is not None:
                    # Normal at the start of fp16 training, while the scaler calibrates.
                    why = (
                        f"fp16 gradients overflowed at loss scale "
                        f"{self.grad_scaler.get_scale():g}, which is now lowered"
                    )
                logging.warning(
                    "step %d: %s; optimiser step skipped and BatchNorm statistics restored "
                    "(%d skipped so far)",
                    self.global_step,
                    why,
                    self.skips.total + 1,
                )
        if self.grad_scaler is not None:
            self.grad_scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.skips.record(skipped=not finite, global_step=self.global_step)
        return finite

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
            "rng_state": capture_rng_state(),
            "skipped_steps": self.skips.total,
            # Elastic resume: the layout of the class centres, what epoch_step counts, and
            # where the global step sits on the schedule.
            "world_size": self.env.world_size,
            "total_batch_size": self.total_batch_size,
            "lr_schedule": {
                "reference_total_batch_size": self.schedule_batch_size,
                **self.schedule.anchors(),
            },
        }

    def save_state(self, *, epoch: int, epoch_step: int) -> str:
        """Write this rank's checkpoint (checksummed; the previous one is kept). Ctrl-C or
        SIGTERM during the write takes effect when it is complete."""
        with signals_deferred():
            path = save_checkpoint(
                self.state(epoch=epoch, epoch_step=epoch_step), self.cfg.output, self.env.rank
            )
            self.last_checkpoint = path
        return path

    def save_model(self) -> str:
        path = model_path(self.cfg.output)
        with signals_deferred():
            atomic_save(self.backbone.state_dict(), path)
        return path

    def resume(self) -> None:
        """Load this rank's newest verified checkpoint (falling back to the previous one if the
        newest is corrupt); training continues after its ``global_step``.

        All ranks must resume from the same step: otherwise they would train at different
        learning rates and deadlock at the end. A rank ahead of the others falls back to its
        previous checkpoint when that matches; else every rank fails naming each rank's step.

        Checkpoints written by another number of ranks are resharded, and the position in the
        data and the schedule re-derived (:mod:`otface.train.elastic`).
        """
        ckpt, path, source_world_size = self._load_resume_checkpoint()
        cfg = self.cfg
        position = resume_position(
            ckpt,
            saved_total_batch_size=int(
                ckpt.get("total_batch_size", cfg.batch_size * source_world_size)
            ),
            total_batch_size=self.total_batch_size,
            num_image=cfg.num_image,
            num_epoch=cfg.num_epoch,
            warmup_epoch=cfg.warmup_epoch,
        )
        self.schedule_batch_size = position.reference_total_batch_size
        if position.schedule != self.schedule:
            # Before the optimiser's state: a new LambdaLR sets the learning rate of step 0.
            self.schedule = position.schedule
            self.total_step = position.schedule.end_step()
            self.lr_scheduler = build_lr_scheduler(
                self.optimizer, warmup_steps=0, total_steps=0, schedule=position.schedule
            )
        self.backbone.load_state_dict(ckpt["state_dict_backbone"])
        self.criterion.partial_fc.load_state_dict(ckpt["state_dict_softmax_fc"])
        self.optimizer.load_state_dict(ckpt["state_optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["state_lr_scheduler"])
        if self.grad_scaler is not None and ckpt.get("state_grad_scaler"):
            self.grad_scaler.load_state_dict(ckpt["state_grad_scaler"])
        self.global_step = int(ckpt["global_step"])
        self.skips.total = int(ckpt.get("skipped_steps", 0))
        self.start_epoch, self.start_batch = position.epoch, position.epoch_step
        self._resumed_rng = ckpt.get("rng_state")
        if source_world_size != self.env.world_size:
            logging.info(
                "resharded Partial FC's %d class centres and their optimiser state from %d "
                "checkpoint files to %d ranks at global step %d; %s",
                cfg.num_classes,
                source_world_size,
                self.env.world_size,
                self.global_step,
                position.note,
            )
        elif position.note:
            logging.info("resuming at global step %d: %s", self.global_step, position.note)
        self.last_checkpoint = path
        logging.info(
            "resumed from %s: epoch %d, batch %d of the epoch, global step %d, learning rate %.6f",
            path,
            self.start_epoch,
            self.start_batch,
            self.global_step,
            self.lr,
        )
        if self._resumed_rng is None:
            logging.warning(
                "%s holds no RNG state (written by arcface_torch or an older otface): the resumed "
                "run will not repeat the uninterrupted one exactly",
                path,
            )

    def restore_rng(self) -> None:
        """Put back the RNG state of the resumed checkpoint; call just before the first step."""
        restore_rng_state(self._resumed_rng)
        self._resumed_rng = None

    def _load_resume_checkpoint(self) -> tuple[dict, str, int]:
        """This rank's checkpoint, resharded when another number of ranks wrote it, the file
        it came from, and that number of ranks."""
        candidates = find_saved_runs(self.cfg.output) if self.env.rank == 0 else None
        if self.env.distributed:
            candidates = _gather(candidates)[0]
        if not candidates or candidates[0][1] == self.env.world_size:
            ckpt, path = self._load_agreed_checkpoint()
            return ckpt, path, self.env.world_size
        source = candidates[0][1]
        state, path, source = load_resharded(
            self.cfg.output,
            rank=self.env.rank,
            world_size=self.env.world_size,
            num_classes=self.cfg.num_classes,
            candidates=[c for c in candidates if c[1] == source],
        )
        return state, path, source

    def _load_agreed_checkpoint(self) -> tuple[dict, str]:
        output, rank = self.cfg.output, self.env.rank
        ckpt, path, problem = None, None, None
        try:
            ckpt, path = load_latest_checkpoint(output, rank, map_location=self.device)
        except CheckpointError as err:
            problem = str(err)
        if not self.env.distributed:
            if problem:
                raise CheckpointError(problem)
            return ckpt, path
        views = _gather((problem, _resume_point(ckpt)))
        failed = [(r, p) for r, (p, _) in enumerate(views) if p]
        if failed:
            raise CheckpointError(
                "cannot resume: " + "; ".join(f"rank {r}: {p}" for r, p in failed)
            )
        points = [point for _, point in views]
        if len(set(points)) == 1:
            return ckpt, path
        target = min(p[0] for p in points)
        if _resume_point(ckpt)[0] != target:
            try:
                ckpt, path = load_latest_checkpoint(
                    output, rank, map_location=self.device, global_step=target
                )
            except CheckpointError:
                pass
        changed = _resume_point(ckpt)[0] != points[rank][0]
        agreed = _gather(_resume_point(ckpt))
        if len(set(agreed)) != 1:
            raise CheckpointError(
                "ranks disagree on where to resume and have no common checkpoint: "
                + ", ".join(
                    f"rank {r} at global step {g} (epoch {e}, batch {b})"
                    for r, (g, e, b) in enumerate(points)
                )
                + f"; checkpoints are in {output}"
            )
        if changed:
            logging.warning(
                "rank %d resumes from its previous checkpoint %s (global step %d) so that all "
                "ranks start from the same step",
                rank,
                path,
                target,
            )
        return ckpt, path


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


def _rank_local_buffers() -> dict[str, bool]:
    """BatchNorm statistics stay per rank, as arcface_torch (``broadcast_buffers=False``;
    newer torch names it ``forward_sync_buffers`` and deprecates the old name)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _resume_point(ckpt: dict | None) -> tuple[int, int, int]:
    if ckpt is None:
        return (-1, -1, -1)
    return (int(ckpt["global_step"]), int(ckpt["epoch"]), int(ckpt.get("epoch_step", 0)))


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def prepare_data(cfg):
    """Resolve ``cfg.rec`` (generating the demo data on first use), open the training set and
    check it against the config: index, labels, sizes, and the sampler's needs. Bad data or a
    mismatch is a :class:`ConfigError` naming the file or key; run it before anything is
    written. Returns the dataset for :func:`fit` (opened once: a ``.rec`` index check reads
    every record's header)."""
    from otface.data import DatasetInfo, build_dataset, check_dataset_config, prepare_rec
    from otface.data.sampler import num_batches_per_epoch

    try:
        cfg.rec = prepare_rec(cfg.rec)
        dataset = build_dataset(cfg, normalize=False, report_bad=True)
        if cfg.rec != "synthetic":
            labels = dataset.labels
            check_dataset_config(cfg, DatasetInfo(int(labels.max()) + 1, int(labels.size)))
        num_batches_per_epoch(cfg.num_image, batch_size=cfg.batch_size, world_size=1)
    except (ValueError, OSError) as err:  # RecordIOError is a ValueError
        raise ConfigError(str(err)) from None
    return dataset


def _log_config(cfg) -> None:
    for key, value in cfg.items():
        logging.info(": %s %s", key.ljust(25), value)


def _build_loader(cfg, env: DistEnv, dataset):
    from otface.data import build_train_loader

    # On CUDA the loader's uint8 batches stay pinned and are normalised on the GPU in
    # train_step; normalising them on the host would hand out unpinned float32 batches
    # (4x the bytes, a synchronous copy) and cost the main process CPU time every step.
    try:
        return build_train_loader(
            cfg,
            rank=env.rank,
            world_size=env.world_size,
            normalize=env.device.type != "cuda",
            dataset=dataset,
        )
    except ValueError as err:  # the sampler's or dataset's checks: too few identities, ...
        raise ConfigError(str(err)) from None


def fit(
    cfg,
    env: DistEnv,
    *,
    backbone_factory: BackboneFactory | None = None,
    dataset=None,
) -> Trainer:
    """Run the whole training job of ``cfg`` on this rank.

    ``backbone_factory(cfg, device)`` builds the network (default :func:`build_backbone`).
    ``dataset`` is what :func:`prepare_data` returned, when the caller ran it.
    """
    seed_everything(cfg.seed)
    if dataset is None:
        dataset = prepare_data(cfg)
    loader = _build_loader(cfg, env, dataset)
    for stale in remove_stale_temp_files(cfg.output, rank=env.rank):
        logging.warning("removed %s, left by an interrupted save", stale)
    trainer = Trainer(cfg, env, backbone_factory=backbone_factory)
    if cfg.resume:
        trainer.resume()
    leftover = trainer.total_step % cfg.gradient_acc
    if leftover:
        logging.warning(
            "%d steps are not a multiple of gradient_acc = %d: the gradients of the last %d "
            "batches are never applied",
            trainer.total_step,
            cfg.gradient_acc,
            leftover,
        )

    writer = None
    verification = None
    if env.rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=os.path.join(cfg.output, "tensorboard"))
        _log_config(cfg)
        if os.path.isdir(cfg.rec) and cfg.val_targets:
            from otface.evaluation import VerificationCallback

            verification = VerificationCallback(
                list(cfg.val_targets), cfg.rec, summary_writer=writer
            )
    step_logger = StepLogger(
        frequent=cfg.frequent,
        total_step=trainer.total_step,
        batch_size=cfg.batch_size,
        world_size=env.world_size,
        start_step=trainer.global_step,
        writer=writer,
    )
    files = getattr(loader, "max_bad_images", None) is not None

    def verify() -> None:
        if verification is not None:
            verification(trainer.global_step, trainer.backbone)

    trainer.backbone.train()
    trainer.restore_rng()  # last, so that nothing between the resume and step 1 draws from it
    try:
        for epoch in range(trainer.start_epoch, cfg.num_epoch):
            first = trainer.start_batch if epoch == trainer.start_epoch else 0
            loader.batch_sampler.set_epoch(epoch, start_batch=first)
            batches = DevicePrefetcher(loader, env.device, channels_last=trainer.channels_last)
            for batch_idx, (img, labels) in enumerate(batches, start=first):
                out = trainer.train_step(img, labels)
                step = trainer.global_step
                if step % cfg.frequent == 0:
                    # get_scale() copies the scale to the host (a device sync): read it only
                    # on the steps that write a log line.
                    counters = {"skipped_steps": trainer.skipped_steps}
                    if files:
                        counters["bad_images"] = loader.bad_images_total
                    step_logger(
                        step,
                        out.metrics,
                        epoch=epoch,
                        lr=trainer.lr,
                        grad_scale=trainer.grad_scaler.get_scale() if trainer.grad_scaler else None,
                        counters=counters,
                    )
                else:
                    step_logger(step, out.metrics, epoch=epoch, lr=trainer.lr)
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
                "finished: %d steps (%d optimiser steps skipped), model saved to %s",
                trainer.global_step,
                trainer.skipped_steps,
                model_path(cfg.output),
            )
    finally:
        if writer is not None:
            writer.close()
        RUN.last_checkpoint = trainer.last_checkpoint
    return trainer
