"""Resuming on a different number of ranks, or with another global batch, than the run that
wrote the checkpoints.

Two things change with the world size ``N → M`` (the per-rank ``batch_size`` stays):

* **The layout of Partial FC's class centres.** Each new rank gathers its rows (and their
  optimiser state) from the old files that overlap them (:mod:`otface.train.reshard`); the
  backbone, its optimiser state, the RNG and the counters come from old rank ``r``'s file, or
  rank 0's for ranks that did not exist.
* **The position in the data and in the schedule.** ``epoch_step`` counts batches of the old
  global batch ``G = batch_size * N``. The images already read in the epoch,
  ``epoch_step * G_old``, are re-expressed in new global batches, rounded down: the new run
  restarts the epoch's global order at that point (both samplers deal one global order out to
  the ranks), so at most one new global batch of images is read twice in that epoch (with the
  P×K sampler, a few groups that a step deferred to the next may also fall on the other side
  of that point), and from the next epoch on the order is the new world size's. The global
  step continues where it was, with the same learning rate; the rest of the schedule is
  stretched over the steps that remain under the new world size, so that it still reaches zero
  at the end of the last epoch (:class:`otface.train.lr.ScheduleMap`).

Checkpoints record ``world_size`` and ``total_batch_size``; for files without them (older otface,
arcface_torch) the world size is the number of ``checkpoint_gpu_{r}.pt`` files present.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

from otface.dist import is_distributed
from otface.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_latest_checkpoint,
    previous_checkpoint_path,
    read_header,
)
from otface.train.lr import ScheduleMap
from otface.train.reshard import gather_fc_rows, with_fc_shard

__all__ = ["Position", "Resharded", "find_saved_runs", "load_resharded", "resume_position"]

logger = logging.getLogger(__name__)


class Resharded(NamedTuple):
    """A checkpoint rebuilt for this rank, the file its non-Partial-FC state came from, and the
    number of ranks that wrote the files."""

    state: dict[str, Any]
    path: str
    source_world_size: int


class Position(NamedTuple):
    """Where a resumed run starts: the epoch, its first batch, the schedule map and the global
    batch its schedule was laid out for."""

    epoch: int
    epoch_step: int
    schedule: ScheduleMap
    reference_total_batch_size: int
    note: str


def _share(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _count_rank_files(output: str) -> int:
    n = 0
    while any(
        os.path.isfile(p) for p in (checkpoint_path(output, n), previous_checkpoint_path(output, n))
    ):
        n += 1
    return n


def find_saved_runs(output: str, *, run_id: str | None = None) -> list[tuple[int, int]]:
    """``(global_step, world size)`` of rank 0's newest and previous checkpoints, newest first;
    with ``run_id``, only those of that run (or written before run ids).

    Call on one rank and share the answer: a world size missing from a file is the number of
    ranks with checkpoint files in ``output``.
    """
    found = []
    for path in (checkpoint_path(output, 0), previous_checkpoint_path(output, 0)):
        state = read_header(path)
        if state is not None and run_id and state.get("run_id") not in (None, run_id):
            continue
        if state is not None:
            world_size = state.get("world_size") or _count_rank_files(output)
            found.append((int(state["global_step"]), int(world_size)))
    return found


def _rebuild(
    output: str,
    step: int,
    source: int,
    rank: int,
    world_size: int,
    num_classes: int,
    run_id: str | None,
) -> Resharded:
    cache: dict[int, tuple[dict[str, Any], str]] = {}

    def load(s: int) -> tuple[dict[str, Any], str]:
        if s not in cache:
            cache[s] = tuple(load_latest_checkpoint(output, s, global_step=step, run_id=run_id))
        return cache[s]

    base, path = load(rank if rank < source else 0)
    shard = gather_fc_rows(
        load, source_world_size=source, num_classes=num_classes, rank=rank, world_size=world_size
    )
    return Resharded(with_fc_shard(base, shard, path), path, source)


def load_resharded(
    output: str,
    *,
    rank: int,
    world_size: int,
    num_classes: int,
    candidates: list[tuple[int, int]],
    run_id: str | None = None,
) -> Resharded:
    """This rank's checkpoint rebuilt from the files of a run on another number of ranks.

    Tries each ``(global_step, source world size)`` of ``candidates`` in turn (all ranks
    together) until every rank finds every file it needs at that step, verified (and of run
    ``run_id`` when given).

    Raises:
        CheckpointError: no candidate step has all the files (the message names each rank's
            problem at the last step tried).
    """
    problems: list[tuple[int, str]] = []
    for step, source in candidates:
        result, problem = None, None
        try:
            result = _rebuild(output, step, source, rank, world_size, num_classes, run_id)
        except CheckpointError as err:
            problem = str(err)
        problems = [(r, p) for r, p in enumerate(_share(problem)) if p]
        if not problems:
            return result
        logger.warning(
            "cannot reshard the checkpoints at global step %d: %s",
            step,
            "; ".join(f"rank {r}: {p}" for r, p in problems),
        )
    if not candidates:
        raise CheckpointError(f"no readable checkpoint_gpu_0.pt in {output} to resume from")
    raise CheckpointError(
        f"cannot resume on {world_size} ranks from the checkpoints in {output}: "
        + "; ".join(f"rank {r}: {p}" for r, p in problems)
    )


def resume_position(
    ckpt: dict[str, Any],
    *,
    saved_total_batch_size: int,
    total_batch_size: int,
    num_image: int,
    num_epoch: int,
    warmup_epoch: float,
) -> Position:
    """Where to continue after ``ckpt``, for a run whose global batch is ``total_batch_size``.

    The schedule is the config's (``num_image``, ``num_epoch``, ``warmup_epoch``) laid out in
    steps of the global batch the run started with; the map saved in ``ckpt["lr_schedule"]``
    places the global step on it. It is re-anchored when the global batch changes, or when a
    re-anchored map no longer ends at the end of the last epoch (the config changed).

    Args:
        ckpt: the training checkpoint (``epoch``, ``epoch_step``, ``global_step``, and
            ``lr_schedule`` when written by this version).
        saved_total_batch_size: the global batch that ``epoch_step`` counts.
        total_batch_size, num_image, num_epoch, warmup_epoch: the resumed run's.
    """
    steps_per_epoch = num_image // total_batch_size
    epoch, batch = int(ckpt["epoch"]), int(ckpt.get("epoch_step", 0))
    step = int(ckpt["global_step"])
    record = ckpt.get("lr_schedule") or {}
    reference = int(record.get("reference_total_batch_size", saved_total_batch_size))
    reference_epoch = num_image // reference
    schedule = ScheduleMap(
        int(reference_epoch * warmup_epoch),
        reference_epoch * num_epoch,
        **{k: record[k] for k in ("anchor_step", "anchor_position", "rate") if k in record},
    )
    note = ""
    if saved_total_batch_size != total_batch_size:
        new_batch = batch * saved_total_batch_size // total_batch_size
        note = (
            f"global batch {saved_total_batch_size} -> {total_batch_size}: epoch {epoch} "
            f"continues at batch {min(new_batch, steps_per_epoch)} of {steps_per_epoch} "
            f"(batch {batch} before)"
        )
        batch = new_batch
    if batch >= steps_per_epoch:
        epoch, batch = epoch + 1, 0
    remaining = max(0, (num_epoch - epoch) * steps_per_epoch - batch)
    if note or (not schedule.is_identity and schedule.end_step() != step + remaining):
        schedule = schedule.reanchored(step, remaining)
        note += f"{'; ' if note else ''}the learning-rate schedule spans the {remaining} steps left"
    return Position(epoch, batch, schedule, reference, note)
