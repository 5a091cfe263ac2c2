"""Resuming a run: every rank agrees on the checkpoint step it continues from, checkpoints
written by another number of ranks are resharded, and the trainer takes back its weights,
optimiser, schedule, position in the data and RNG state."""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import torch

from otface.config import ConfigError
from otface.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_latest_checkpoint,
    previous_checkpoint_path,
    read_header,
)
from otface.train.distributed import DistEnv
from otface.train.elastic import find_saved_runs, load_resharded, resume_position
from otface.train.identity import folder_run_id, model_metadata, new_run_id, share
from otface.train.lr import build_lr_scheduler
from otface.train.rng import restore_rng_state

__all__ = [
    "SHAPE_KEYS",
    "ResumeCheckpoint",
    "ResumeMixin",
    "check_before_start",
    "check_saved_config",
    "load_resume_checkpoint",
    "resume_run_id",
]

SHAPE_KEYS = ("network", "num_classes", "embedding_size")
"""Config keys that fix the shapes of a checkpoint's tensors; a checkpoint records them
(``run_config``) so that a resume with another value fails before any tensor is read."""


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
    ``lr_scheduler``, ``skips.total``, ``last_checkpoint``, ``run_id`` (the run continued;
    when it is already set, only that run's checkpoints are taken) and the RNG state to
    restore.
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
        if self.run_id is None:
            self.run_id = resume_run_id(self.cfg.output, self.env)
        check_saved_config(self.cfg, self.env.rank, run_id=self.run_id)
        ckpt, path, source_world_size = load_resume_checkpoint(
            self.cfg, self.env, run_id=self.run_id
        )
        cfg = self.cfg
        if ckpt.get("run_id") is None:
            if self.run_id is None:  # this run is given one from now on
                self.run_id = share(new_run_id(), distributed=self.env.distributed)
            logging.warning(
                "%s was written before runs had ids: it cannot be checked to belong to this "
                "run; resuming from it as run %s",
                path,
                self.run_id,
            )
        else:
            self.run_id = str(ckpt["run_id"])
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
        _check_head_state(ckpt["state_dict_softmax_fc"], self.criterion.partial_fc, cfg, path)
        try:
            self.backbone.load_state_dict(ckpt["state_dict_backbone"])
            self.criterion.partial_fc.load_state_dict(ckpt["state_dict_softmax_fc"])
        except RuntimeError as err:  # a checkpoint that records no run_config
            first = str(err).strip().splitlines()
            raise ConfigError(
                f"{path} does not fit this config's {', '.join(SHAPE_KEYS)} "
                f"({first[-1].strip() if first else err}); put back the values the run was "
                "started with, or start a new run with init_backbone = this checkpoint's "
                "model.pt"
            ) from None
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


def resume_run_id(output: str, env: DistEnv) -> str | None:
    """The run a resume in ``output`` continues (:func:`otface.train.identity.folder_run_id`),
    as rank 0 reads it, on every rank."""
    found = folder_run_id(output) if env.rank == 0 else None
    return share(found, distributed=env.distributed)


def check_before_start(cfg, env: DistEnv) -> str | None:
    """What a resume can know before it writes anything, on every rank as rank 0 sees it.

    Returns:
        A one-line message when the run has already finished (its last checkpoint is at the
        end of the last epoch and ``model.pt`` was written at that step), else ``None``.

    Raises:
        CheckpointError: ``output`` holds no checkpoint at all.
        ConfigError: a key of :data:`SHAPE_KEYS` differs from the run's
            (:func:`check_saved_config`).
    """
    problem: tuple[str, str] | None = None
    finished = None
    if env.rank == 0:
        try:
            finished = _finished(cfg)
        except (CheckpointError, ConfigError) as err:
            problem = (type(err).__name__, str(err))
    problem, finished = share((problem, finished), distributed=env.distributed)
    if problem is not None:
        raise (CheckpointError if problem[0] == "CheckpointError" else ConfigError)(problem[1])
    return finished


def _finished(cfg) -> str | None:
    output = cfg.output
    paths = (checkpoint_path(output, 0), previous_checkpoint_path(output, 0))
    if not any(os.path.isfile(p) for p in paths):
        done = _finished_without_checkpoints(output)
        if done is not None:
            return done
        raise CheckpointError(
            f"resume = True but {output} holds no checkpoint ({os.path.basename(paths[0])}) "
            "to resume from; nothing was written. Checkpoints are written when save_all_states "
            "= True (at the end of each epoch, and every save_every_steps steps)"
        )
    run_id = folder_run_id(output)
    check_saved_config(cfg, 0, run_id=run_id)
    header = read_header(paths[0])
    if header is None or int(header["epoch"]) < cfg.num_epoch or header.get("run_id") != run_id:
        return None
    model = os.path.join(output, "model.pt")
    record = _model_record(model)  # none usable: the resumed loop writes it
    if record.get("run_id") != run_id or record.get("global_step") != header["global_step"]:
        return None
    return (
        f"run {run_id} in {output} has already finished all its {header['global_step']} "
        f"steps and written {model}; nothing to train (to train again, start a new run with "
        "--overwrite or another output)"
    )


def _model_record(model: str) -> dict:
    """``model.pt``'s run record (:func:`otface.train.identity.model_metadata`); empty when the
    file is missing or unreadable."""
    if not os.path.isfile(model):
        return {}
    try:
        return model_metadata(torch.load(model, map_location="cpu", mmap=True)) or {}
    except Exception:  # noqa: BLE001 - any unreadable model.pt counts as none
        return {}


def _finished_without_checkpoints(output: str) -> str | None:
    """The finished-run line for a run that kept no checkpoints (``save_all_states = False``)
    but wrote its ``model.pt``: the log's run and the model's agree."""
    run_id = folder_run_id(output)
    model = os.path.join(output, "model.pt")
    record = _model_record(model)
    if run_id is None or record.get("run_id") != run_id:
        return None
    return (
        f"run {run_id} in {output} has already finished ({record.get('global_step')} steps) "
        f"and written {model}; it kept no checkpoints (save_all_states = False), so there is "
        "nothing to resume (to train again, start a new run with --overwrite or another output)"
    )


def check_saved_config(cfg, rank: int = 0, *, run_id: str | None = None) -> None:
    """Compare the config with the one this rank's newest checkpoint of run ``run_id`` (else
    its previous one) was written under, reading no tensor.

    Raises:
        ConfigError: a key of :data:`SHAPE_KEYS` differs; the message names it, both values,
            and what to do.
    """
    for path in (checkpoint_path(cfg.output, rank), previous_checkpoint_path(cfg.output, rank)):
        header = read_header(path)
        if header is None or (run_id and header.get("run_id") not in (None, run_id)):
            continue
        saved = header.get("run_config") or {}
        for key in SHAPE_KEYS:
            if key in saved and saved[key] != cfg[key]:
                model = os.path.join(cfg.output, "model.pt")
                start_from = repr(model) if os.path.isfile(model) else "a model.pt of it"
                raise ConfigError(
                    f"key {key!r}: the run in {cfg.output} was trained with {key} = "
                    f"{saved[key]!r} ({path}) but the config has {cfg[key]!r}; put "
                    f"{key} = {saved[key]!r} back to resume it, or start a new run in another "
                    f"output with init_backbone = {start_from} to start from its backbone"
                )
        return


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


def load_resume_checkpoint(cfg, env: DistEnv, *, run_id: str | None = None) -> ResumeCheckpoint:
    """This rank's checkpoint in ``cfg.output`` (loaded onto ``env.device``), resharded when
    another number of ranks wrote it, the file it came from, and that number of ranks.

    With a process group every rank must call it: the ranks agree on the step through
    collectives (see :meth:`ResumeMixin.resume`).

    Only checkpoints of run ``run_id`` (or written before run ids) are taken.

    Raises:
        CheckpointError: no usable checkpoint, or the ranks have no step in common; the
            message names the files or each rank's step.
    """
    candidates = find_saved_runs(cfg.output, run_id=run_id) if env.rank == 0 else None
    if env.distributed:
        candidates = _gather(candidates)[0]
    if not candidates or candidates[0][1] == env.world_size:
        ckpt, path = _load_agreed_checkpoint(cfg, env, run_id)
        return ResumeCheckpoint(ckpt, path, env.world_size)
    source = candidates[0][1]
    state, path, source = load_resharded(
        cfg.output,
        rank=env.rank,
        world_size=env.world_size,
        num_classes=cfg.num_classes,
        candidates=[c for c in candidates if c[1] == source],
        run_id=run_id,
    )
    return ResumeCheckpoint(state, path, source)


def _load_agreed_checkpoint(cfg, env: DistEnv, run_id: str | None) -> tuple[dict, str]:
    output, rank = cfg.output, env.rank
    ckpt, path, problem = None, None, None
    try:
        ckpt, path = load_latest_checkpoint(output, rank, map_location=env.device, run_id=run_id)
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
                output, rank, map_location=env.device, global_step=target, run_id=run_id
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
