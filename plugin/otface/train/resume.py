"""Resuming a run: every rank agrees on the checkpoint step it continues from, checkpoints
written by another number of ranks are resharded, and the trainer takes back its weights,
optimiser, schedule, position in the data and RNG state."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from otface.train.checkpoint import CheckpointError, load_latest_checkpoint
from otface.train.distributed import DistEnv
from otface.train.elastic import find_saved_runs, load_resharded, resume_position
from otface.train.lr import build_lr_scheduler
from otface.train.rng import restore_rng_state

__all__ = ["ResumeCheckpoint", "ResumeMixin", "load_resume_checkpoint"]


class ResumeCheckpoint(NamedTuple):
    """This rank's checkpoint to resume from, the file it came from, and how many ranks wrote
    the run's checkpoints."""

    state: dict
    path: str
    source_world_size: int


class ResumeMixin:
    """``resume()`` and ``restore_rng()`` of :class:`otface.train.loop.Trainer`.

    Reads ``cfg``, ``env``, ``backbone``, ``criterion``, ``optimizer``, ``grad_scaler``,
    ``total_batch_size``, ``schedule`` and ``lr``; sets ``global_step``,
    ``start_epoch``, ``start_batch``, ``schedule``, ``schedule_batch_size``, ``total_step``,
    ``lr_scheduler``, ``skips.total``, ``last_checkpoint`` and the RNG state to restore.
    """

    def resume(self) -> None:
        """Load this rank's newest verified checkpoint (falling back to the previous one if the
        newest is corrupt); training continues after its ``global_step``.

        All ranks must resume from the same step: otherwise they would train at different
        learning rates and deadlock at the end. A rank ahead of the others falls back to its
        previous checkpoint when that matches; else every rank fails naming each rank's step.

        Checkpoints written by another number of ranks are resharded, and the position in the
        data and the schedule re-derived (:mod:`otface.train.elastic`).
        """
        ckpt, path, source_world_size = load_resume_checkpoint(self.cfg, self.env)
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
        _check_head_state(ckpt["state_dict_softmax_fc"], self.criterion.partial_fc, cfg, path)
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
        self.last_checkpoint_step = self.global_step
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


def _check_head_state(saved: dict, partial_fc, cfg, path: str) -> None:
    """The checkpoint's Partial FC entries are those of this run's margin head (the class
    centres, plus AdaFace's or CurricularFace's running statistics), else a one-line error."""
    expected = set(partial_fc.state_dict())
    if set(saved) != expected:
        raise CheckpointError(
            f"{path}: key 'state_dict_softmax_fc' holds {sorted(saved)}, but Partial FC with "
            f"head = {cfg.get('head', 'combined')!r} has {sorted(expected)}: resume with the "
            "head the run was trained with"
        )


def load_resume_checkpoint(cfg, env: DistEnv) -> ResumeCheckpoint:
    """This rank's checkpoint in ``cfg.output`` (loaded onto ``env.device``), resharded when
    another number of ranks wrote it, the file it came from, and that number of ranks.

    With a process group every rank must call it: the ranks agree on the step through
    collectives (see :meth:`ResumeMixin.resume`).

    Raises:
        CheckpointError: no usable checkpoint, or the ranks have no step in common; the
            message names the files or each rank's step.
    """
    candidates = find_saved_runs(cfg.output) if env.rank == 0 else None
    if env.distributed:
        candidates = _gather(candidates)[0]
    if not candidates or candidates[0][1] == env.world_size:
        ckpt, path = _load_agreed_checkpoint(cfg, env)
        return ResumeCheckpoint(ckpt, path, env.world_size)
    source = candidates[0][1]
    state, path, source = load_resharded(
        cfg.output,
        rank=env.rank,
        world_size=env.world_size,
        num_classes=cfg.num_classes,
        candidates=[c for c in candidates if c[1] == source],
    )
    return ResumeCheckpoint(state, path, source)


def _load_agreed_checkpoint(cfg, env: DistEnv) -> tuple[dict, str]:
    output, rank = cfg.output, env.rank
    ckpt, path, problem = None, None, None
    try:
        ckpt, path = load_latest_checkpoint(output, rank, map_location=env.device)
    except CheckpointError as err:
        problem = str(err)
    if not env.distributed:
        if problem:
            raise CheckpointError(problem)
        return ckpt, path
    views = _gather((problem, _resume_point(ckpt)))
    failed = [(r, p) for r, (p, _) in enumerate(views) if p]
    if failed:
        raise CheckpointError("cannot resume: " + "; ".join(f"rank {r}: {p}" for r, p in failed))
    points = [point for _, point in views]
    if len(set(points)) == 1:
        return ckpt, path
    target = min(p[0] for p in points)
    if _resume_point(ckpt)[0] != target:
        try:
            ckpt, path = load_latest_checkpoint(
                output, rank, map_location=env.device, global_step=target
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


def _resume_point(ckpt: dict | None) -> tuple[int, int, int]:
    if ckpt is None:
        return (-1, -1, -1)
    return (int(ckpt["global_step"]), int(ckpt["epoch"]), int(ckpt.get("epoch_step", 0)))


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
