"""arcface_torch's ``train_v2`` flow: DDP backbone, Partial-FC criterion, polynomial LR,
fp16 AMP, gradient accumulation, atomic checkpoints and resume.

This module is the loop itself: :class:`Trainer` (one rank's model, schedule and checkpoints)
and :func:`fit`. The network is built in :mod:`otface.train.model`, the optimiser and its step
in :mod:`otface.train.optim`, the data in :mod:`otface.train.data`; the training step is in
:mod:`otface.train.step` and resuming in :mod:`otface.train.resume`; the names callers import
from here are re-exported.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Callable

import torch
from torch import nn

from otface.config import ConfigError
from otface.registry import LOSSES
from otface.train.checkpoint import (
    atomic_save,
    model_path,
    remove_stale_temp_files,
    save_checkpoint,
)
from otface.train.data import build_loader, prepare_data
from otface.train.distributed import DistEnv
from otface.train.finetune import Freezer, load_init_backbone, load_init_centres
from otface.train.guard import (
    BufferSnapshot,
    NonFiniteState,
    SkipCounter,
    TooManySkippedSteps,
    first_nonfinite,
)
from otface.train.identity import new_run_id, share, stamp_model
from otface.train.log import (
    SafeSummaryWriter,
    StepLogger,
    log_config,
    log_run_header,
    raise_write_failure,
    tensorboard_dir,
)
from otface.train.lr import ScheduleMap, build_lr_scheduler
from otface.train.model import (
    BackboneFactory,
    apply_fused_bn_prelu,
    build_backbone,
    compile_backbone,
    eager_stance,
    resolve_channels_last,
    wrap_ddp,
)
from otface.train.optim import GRAD_CLIP_NORM as GRAD_CLIP_NORM  # re-exported for benchmarks
from otface.train.optim import build_grad_scaler, build_optimizer
from otface.train.prefetch import DevicePrefetcher
from otface.train.resume import SHAPE_KEYS, ResumeMixin, resume_run_id
from otface.train.rng import capture_rng_state, seed_everything
from otface.train.signals import RUN, signals_deferred
from otface.train.step import StepMixin
from otface.train.wandb_log import WandbLogger
from otface.train.workers import dead_worker_error

__all__ = [
    "Trainer",
    "build_backbone",
    "build_grad_scaler",
    "compile_backbone",
    "fit",
    "prepare_data",
    "seed_everything",
]


class Trainer(StepMixin, ResumeMixin):
    """One rank's model, criterion, optimiser and schedule.

    Args:
        cfg: a validated config (:func:`otface.config.load_config`).
        env: this process's ranks and device.
        backbone_factory: ``factory(cfg, device) -> nn.Module`` building the network; by
            default :func:`build_backbone` (this package's backbones).

    :meth:`train_step`, :attr:`skipped_steps` and :attr:`lr` come from
    :class:`otface.train.step.StepMixin`; :meth:`resume` and :meth:`restore_rng` from
    :class:`otface.train.resume.ResumeMixin`.
    """

    def __init__(
        self, cfg, env: DistEnv, *, backbone_factory: BackboneFactory | None = None
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.device = env.device
        self.backbone = (backbone_factory or build_backbone)(cfg, self.device)
        # Fine-tuning (otface.train.finetune): lines for the log, written after its header.
        self.init_notes: list[str] = []
        if cfg.get("init_backbone"):
            if cfg.resume:
                self.init_notes.append(
                    f"init_backbone = {cfg.init_backbone!r} not loaded: resume = True takes the "
                    "backbone from this run's checkpoint"
                )
            else:
                self.init_notes.append(load_init_backbone(cfg, self.backbone))
        # NHWC convolutions on CUDA (config.channels_last); the state_dict is unchanged.
        self.channels_last = resolve_channels_last(cfg.get("channels_last", "auto"), self.device)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        apply_fused_bn_prelu(self.backbone, cfg.get("fused_bn_prelu", "off"))
        self.compiled = compile_backbone(
            self.backbone, cfg.get("compile", False), cfg.get("compile_scope", "blocks")
        )
        try:
            builder = LOSSES.get(cfg.loss)
        except KeyError as err:
            raise ConfigError(f"key 'loss': {err.args[0]}") from None
        self.criterion = builder(
            cfg, backbone=self.backbone, rank=env.rank, world_size=env.world_size
        ).to(self.device)
        if cfg.get("init_centres"):
            self.init_notes.append(
                load_init_centres(
                    cfg, self.criterion.partial_fc, rank=env.rank, world_size=env.world_size
                )
            )
        if float(cfg.get("backbone_lr_mult", 1.0)) != 1.0:
            self.init_notes.append(
                f"backbone_lr_mult: the backbone learns at {cfg.backbone_lr_mult:g} x lr; the "
                "logged lr is the class centres'"
            )
        self.model: nn.Module = self.backbone
        if env.distributed:
            self.model = wrap_ddp(self.backbone, self.device)
        self.optimizer = build_optimizer(cfg, self.backbone, self.criterion)
        self.total_batch_size = cfg.batch_size * env.world_size
        self.steps_per_epoch = cfg.num_image // self.total_batch_size
        self.warmup_step = int(self.steps_per_epoch * cfg.warmup_epoch)
        self.total_step = self.steps_per_epoch * cfg.num_epoch
        self.freezer = Freezer(cfg, self.backbone, total_steps=self.total_step)
        if self.freezer.active:
            self.init_notes.append(self.freezer.describe())
        if self.freezer.active and self.freezer.steps >= self.total_step and not cfg.resume:
            what = "the backbone" if self.freezer.stages == "all" else "the frozen stages"
            warnings.warn(
                f"freeze_steps = {cfg.freeze_steps} covers the whole run of "
                f"{self.total_step} steps: {what} will not train at all; set freeze_steps "
                f"below {self.total_step}, or to a fraction of the run (e.g. 0.25)",
                stacklevel=2,
            )
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
        # BatchNorm statistics (and a margin head's running statistics) change in the forward,
        # before a non-finite loss can be seen: a skipped step restores them from this snapshot.
        self._buffers = BufferSnapshot(self.backbone, self.criterion.partial_fc)
        self.start_epoch = 0
        self.start_batch = 0
        self.last_checkpoint: str | None = None
        self.last_checkpoint_step: int | None = None
        # This run's id (otface.train.identity): set by fit for a fresh start, or by resume.
        self.run_id: str | None = None
        # The step this process started from (after a resume): its first step is logged too.
        self.log_start_step = 0
        self._resumed_rng: dict | None = None
        self._synced_once = False
        self.step_graph = self._build_step_graph(cfg.get("cuda_graph", "off"))

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
            "run_id": self.run_id,
            # What fixes the tensors' shapes: a resume compares it before reading them.
            "run_config": {key: self.cfg[key] for key in SHAPE_KEYS},
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
        SIGTERM during the write takes effect when it is complete. State holding NaN or Inf is
        never written (:class:`NonFiniteState`; the previous files stay)."""
        state = self.state(epoch=epoch, epoch_step=epoch_step)
        _refuse_nonfinite(
            {k: state[k] for k in ("state_dict_backbone", "state_dict_softmax_fc")},
            f"the checkpoint of rank {self.env.rank} at global step {self.global_step}",
        )
        with signals_deferred():
            path = save_checkpoint(state, self.cfg.output, self.env.rank)
            self.last_checkpoint = path
            self.last_checkpoint_step = self.global_step
        return path

    def save_model(self) -> str:
        path = model_path(self.cfg.output)
        state = self.backbone.state_dict()
        _refuse_nonfinite(state, f"{path} at global step {self.global_step}")
        stamp_model(state, run_id=self.run_id, global_step=self.global_step)
        with signals_deferred():
            atomic_save(state, path)
        return path

    def check_skipped_fraction(self) -> None:
        """Stop (:class:`TooManySkippedSteps`) when more than ``max_skipped_fraction`` of the
        optimiser steps so far were skipped: the run has diverged."""
        limit = float(self.cfg.get("max_skipped_fraction", 1.0))
        updates = self.global_step // self.cfg.gradient_acc
        if limit >= 1.0 or updates == 0:
            return
        fraction = self.skips.total / updates
        if fraction > limit:
            raise TooManySkippedSteps(
                f"{self.skips.total} of {updates} optimiser steps ({100 * fraction:.0f}%) were "
                f"skipped for a non-finite loss, gradient or BatchNorm statistic, more than "
                f"max_skipped_fraction = {limit:g}: the run has diverged and is not saved as "
                f"finished (model.pt not written at global step {self.global_step}); lower "
                "the learning rate and check the data for NaN/Inf images"
            )


def _warn_earlier_checkpoint(cfg, env: DistEnv) -> None:
    """A fresh run (resume = False) in a folder that holds another run's checkpoint: say so
    before anything replaces it."""
    from otface.train.checkpoint import checkpoint_path

    path = checkpoint_path(cfg.output, env.rank)
    if env.rank == 0 and os.path.isfile(path):
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))
        logging.warning(
            "%s already holds %s from an earlier run (written %s); this run starts afresh "
            "(resume = False) and replaces it at its first checkpoint",
            cfg.output,
            os.path.basename(path),
            written,
        )


def _refuse_nonfinite(tensors, what: str) -> None:
    name = first_nonfinite(tensors)
    if name is not None:
        raise NonFiniteState(
            f"not saving {what}: {name} holds NaN or Inf; the files already written are "
            "kept as they were. The run has diverged: lower the learning rate"
        )


def fit(
    cfg,
    env: DistEnv,
    *,
    backbone_factory: BackboneFactory | None = None,
    dataset=None,
    on_first_step: Callable[[], None] | None = None,
) -> Trainer:
    """Run the whole training job of ``cfg`` on this rank.

    ``backbone_factory(cfg, device)`` builds the network (default :func:`build_backbone`).
    ``dataset`` is what :func:`prepare_data` returned, when the caller ran it.
    ``on_first_step()`` is called once, after this start's first training step.

    Raises:
        DataLoaderWorkerDied: a DataLoader worker process died (one line: which, how).
    """
    seed_everything(cfg.seed)
    if dataset is None:
        dataset = prepare_data(cfg)
    loader = build_loader(cfg, env, dataset)
    run_id = resume_run_id(cfg.output, env) if cfg.resume else None
    if run_id is None:  # a fresh start, or a folder where nothing names a run
        run_id = share(new_run_id(), distributed=env.distributed)
    if env.rank == 0:
        # First: what building the model warns about comes after it.
        log_run_header(cfg, env.world_size, run_id)
    trainer = Trainer(cfg, env, backbone_factory=backbone_factory)
    trainer.run_id = run_id
    remove_stale_temp_files(cfg.output, rank=env.rank)  # (warns naming them)
    if cfg.resume:
        trainer.resume()
    else:
        _warn_earlier_checkpoint(cfg, env)
    trainer.log_start_step = trainer.global_step
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
    wandb_run = None
    if env.rank == 0:
        writer = SafeSummaryWriter(tensorboard_dir(cfg, trainer.run_id))
        log_config(cfg, trainer.total_step)
        for note in [*getattr(dataset, "size_notes", []), *trainer.init_notes]:
            logging.info("%s", note)
        wandb_run = WandbLogger.start(cfg, rank=env.rank)
        if os.path.isdir(cfg.rec) and cfg.val_targets:
            from otface.evaluation import VerificationCallback

            verification = VerificationCallback(
                list(cfg.val_targets), cfg.rec, summary_writer=writer, wandb_logger=wandb_run
            )
    step_logger = StepLogger(
        frequent=cfg.frequent,
        total_step=trainer.total_step,
        batch_size=cfg.batch_size,
        world_size=env.world_size,
        start_step=trainer.global_step,
        writer=writer,
        wandb=wandb_run,
    )
    files = getattr(loader, "max_bad_images", None) is not None

    def verify() -> None:
        if verification is not None:
            # Eager, even with config.compile: evaluation mode would compile a second set of
            # graphs (minutes for a whole r100) for a few seconds of inference.
            with eager_stance():
                verification(trainer.global_step, trainer.backbone)

    compiled_once = False
    finished = False
    trainer.backbone.train()
    trainer.restore_rng()  # last, so that nothing between the resume and step 1 draws from it
    try:
        for epoch in range(trainer.start_epoch, cfg.num_epoch):
            first = trainer.start_batch if epoch == trainer.start_epoch else 0
            loader.batch_sampler.set_epoch(epoch, start_batch=first)
            batches = DevicePrefetcher(loader, env.device, channels_last=trainer.channels_last)
            for batch_idx, (img, labels) in enumerate(batches, start=first):
                compiling = bool(trainer.compiled) and not compiled_once
                started = time.perf_counter()
                out = trainer.train_step(img, labels)
                step = trainer.global_step
                if on_first_step is not None:
                    on_first_step()
                    on_first_step = None
                if compiling:
                    # The compilation happens in the first step: say what it cost, once (the
                    # loss read waits for the step, as the first log line would).
                    float(out.loss.detach())
                    compiled_once = True
                    logging.info(
                        "torch.compile (mode %s, %s): the first step took %.1f s, compilation "
                        "included",
                        cfg.compile,
                        trainer.compiled,
                        time.perf_counter() - started,
                    )
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
                raise_write_failure()  # a full disk under the log or TensorBoard stops here
                if (
                    cfg.save_every_steps
                    and step % cfg.save_every_steps == 0
                    and step % cfg.gradient_acc == 0
                    and batch_idx + 1 < trainer.steps_per_epoch
                ):
                    # A run past max_skipped_fraction has diverged: stop before saving it.
                    trainer.check_skipped_fraction()
                    trainer.save_state(epoch=epoch, epoch_step=batch_idx + 1)
            trainer.check_skipped_fraction()  # every rank: they count the same skips
            if cfg.save_all_states or cfg.save_every_steps:
                trainer.save_state(epoch=epoch + 1, epoch_step=0)
            if env.rank == 0:
                saved = trainer.save_model()
                if wandb_run is not None and cfg.save_artifacts:
                    wandb_run.log_artifact(saved, f"{wandb_run.name}_E{epoch}")
        if env.rank == 0:
            if trainer.global_step % cfg.verbose != 0:
                verify()
            saved = trainer.save_model()
            if wandb_run is not None and cfg.save_artifacts:
                wandb_run.log_artifact(saved, f"{wandb_run.name}_Final")
            logging.info(
                "finished: %d steps (%d optimiser steps skipped), model saved to %s",
                trainer.global_step,
                trainer.skipped_steps,
                model_path(cfg.output),
            )
        finished = True
    except (RuntimeError, ConnectionError, EOFError) as err:
        died = dead_worker_error(err, loader, num_workers=int(cfg.get("num_workers", 0)))
        if died is None:
            raise
        raise died from None
    finally:
        if writer is not None:
            writer.close()
        if wandb_run is not None:
            wandb_run.finish(0 if finished else 1)
        RUN.last_checkpoint = trainer.last_checkpoint
        RUN.last_checkpoint_step = trainer.last_checkpoint_step
        RUN.global_step = trainer.global_step
    return trainer
