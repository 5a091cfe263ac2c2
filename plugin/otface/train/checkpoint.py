"""Checksummed, rotated, atomic checkpoint files in arcface_torch's layout.

``model.pt`` is the backbone's ``state_dict``. ``checkpoint_gpu_{rank}.pt`` holds ``epoch``,
``global_step``, ``state_dict_backbone``, ``state_dict_softmax_fc``, ``state_optimizer``,
``state_lr_scheduler`` (upstream's keys) plus ``epoch_step`` (batches done in ``epoch``),
``state_grad_scaler``, ``rng_state``, ``skipped_steps``, and for resuming on another number of
ranks ``world_size``, ``total_batch_size`` and ``lr_schedule`` (ours). Both stay plain
``torch.save`` files that arcface_torch reads.

Every file is written atomically (a fsynced temp file renamed over the old one;
:mod:`otface.train.integrity`), so a kill never leaves a truncated file under a real name. For
the training checkpoint, :func:`save_checkpoint` adds two things:

* **Checksum.** A sidecar ``NAME.sha256`` records the SHA-256 and size of the bytes, computed
  while ``torch.save`` writes them; the ``.pt`` itself is unchanged for upstream readers.
* **Rotation.** The last two are kept: ``checkpoint_gpu_{rank}.pt`` (newest) and
  ``checkpoint_gpu_{rank}.prev.pt``, each with its sidecar. A save runs, one atomic rename at a
  time: write the new ``.pt`` to a temp file; rename ``.pt`` to ``.prev.pt``; rename
  ``.pt.sha256`` to ``.prev.pt.sha256``; publish the new ``.pt.sha256``; rename the temp file to
  ``.pt``. A file counts as verified when its size and digest match its own sidecar *or its
  rotation partner's*, which makes every intermediate state safe: right after the first rename
  the old newest (now ``.prev.pt``) is still described by ``.pt.sha256``, and the new ``.pt``
  never appears before its sidecar. At every instant one complete, verifiable checkpoint exists.

:func:`load_latest_checkpoint` verifies the newest, and on a checksum mismatch, an unreadable
file or missing keys warns naming the file and falls back to ``.prev.pt``. A corrupt newest is
renamed to ``checkpoint_gpu_{rank}.pt.corrupt`` (kept as evidence) so the next save does not
rotate it over the good one. A ``.pt`` with no sidecar (written by arcface_torch or an older
otface) is loaded with a one-time warning that it cannot be verified. If another program
rewrites ``checkpoint_gpu_{rank}.pt`` in place, delete its ``.sha256`` or it reads as corrupt.

The file layer (temp files, fsync, sidecars, verification) is :mod:`otface.train.integrity`;
the names of it that callers use are re-exported here.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, NamedTuple

import torch

from otface.train.integrity import (
    CheckpointError,
    FileDigest,
    atomic_save,
    cannot_write,
    checksum_path,
    durable_replace,
    load_verified,
    save_verified,
    sidecar_run_id,
    unlink_quietly,
    verify,
    warn_unverified,
    write_checksum,
    write_temp,
)

__all__ = [
    "CheckpointError",
    "FileDigest",
    "LoadedCheckpoint",
    "atomic_save",
    "checkpoint_path",
    "checksum_path",
    "load_checkpoint",
    "load_latest_checkpoint",
    "model_path",
    "previous_checkpoint_path",
    "load_verified",
    "read_header",
    "remove_stale_temp_files",
    "save_checkpoint",
    "save_verified",
]

logger = logging.getLogger(__name__)

UPSTREAM_KEYS = (
    "epoch",
    "global_step",
    "state_dict_backbone",
    "state_dict_softmax_fc",
    "state_optimizer",
    "state_lr_scheduler",
)

# Temp names made by integrity.write_temp (tempfile.mkstemp: "." + target name + "." + random
# + ".tmp").
_TEMP_RE = re.compile(
    r"^\.(?:checkpoint_gpu_(?P<rank>\d+)(?:\.prev)?\.pt(?:\.sha256)?|(?P<model>model\.pt))"
    r"\.[A-Za-z0-9_]+\.tmp$"
)
_NEXT = ("trying the previous one", "no older checkpoint is kept")


class LoadedCheckpoint(NamedTuple):
    """A loaded ``checkpoint_gpu_{rank}.pt`` dict and the file it came from."""

    state: dict[str, Any]
    path: str


def checkpoint_path(output: str, rank: int) -> str:
    """Newest training checkpoint of ``rank``: ``output/checkpoint_gpu_{rank}.pt``."""
    return os.path.join(output, f"checkpoint_gpu_{rank}.pt")


def previous_checkpoint_path(output: str, rank: int) -> str:
    """The one before it, kept by rotation: ``output/checkpoint_gpu_{rank}.prev.pt``."""
    return os.path.join(output, f"checkpoint_gpu_{rank}.prev.pt")


def model_path(output: str) -> str:
    """Backbone weights for inference and export: ``output/model.pt``."""
    return os.path.join(output, "model.pt")


def save_checkpoint(state: dict[str, Any], output: str, rank: int) -> str:
    """Write ``checkpoint_gpu_{rank}.pt`` with its checksum, keeping the previous one.

    See the module docstring for the order of the renames that keeps one complete, verifiable
    checkpoint on disk at every instant.

    Args:
        state: the training state, a dict with arcface_torch's checkpoint keys.
        output: the run's output folder.
        rank: global rank whose shard this is.

    Returns:
        The path written, ``output/checkpoint_gpu_{rank}.pt``.

    Raises:
        CheckpointError: a file cannot be written or renamed (the message names it and gives
            the reason, e.g. no space left on device); the previous checkpoints are intact.
    """
    newest = checkpoint_path(output, rank)
    previous = previous_checkpoint_path(output, rank)
    tmp, digest = write_temp(newest, lambda f: torch.save(state, f))
    step = newest
    try:
        if os.path.exists(newest):
            step = previous
            if os.path.exists(checksum_path(newest)):
                # Still verified through .pt.sha256 (its partner).
                durable_replace(newest, previous)
                durable_replace(checksum_path(newest), checksum_path(previous))
            else:  # unverifiable upstream/legacy file: the old .prev sidecar must not follow it
                unlink_quietly(checksum_path(previous))
                durable_replace(newest, previous)
        # With no newest (first save, or the last one was interrupted or quarantined) the
        # previous checkpoint is the good one and stays; a stale .pt.sha256 is replaced.
        step = checksum_path(newest)
        write_checksum(newest, digest, run_id=state.get("run_id"))
        step = newest
        durable_replace(tmp, newest)
    except BaseException as err:
        unlink_quietly(tmp)
        if isinstance(err, OSError):
            raise cannot_write(step, err) from err
        raise
    return newest


def _quarantine(path: str) -> None:
    """Move a corrupt newest checkpoint aside so the next save does not rotate it in."""
    try:
        os.replace(path, path + ".corrupt")
        if os.path.exists(checksum_path(path)):
            os.replace(checksum_path(path), checksum_path(path + ".corrupt"))
    except OSError as err:
        logger.warning("could not rename corrupt %s aside: %s", path, err)
        return
    logger.warning("renamed corrupt %s to %s", path, os.path.basename(path) + ".corrupt")


def load_checkpoint(path: str, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read one ``checkpoint_gpu_{rank}.pt`` (no checksum check; see load_latest_checkpoint).

    Raises:
        CheckpointError: it is missing, cannot be read or lacks arcface_torch's keys; the
            message names the file and what is wrong.
    """
    if not os.path.isfile(path):
        raise CheckpointError(
            f"resume = True but {path} does not exist; checkpoints are written when "
            "save_all_states = True (at the end of each epoch, and every save_every_steps steps)"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err
    missing = [k for k in UPSTREAM_KEYS if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {', '.join(missing)})")
    return ckpt


def load_latest_checkpoint(
    output: str,
    rank: int,
    *,
    map_location: Any = "cpu",
    global_step: int | None = None,
    run_id: str | None = None,
) -> LoadedCheckpoint:
    """Load the newest usable checkpoint of ``rank``: ``.pt``, else ``.prev.pt``.

    Each candidate is checked against its checksum (streamed SHA-256), then read with
    ``torch.load`` and checked for arcface_torch's keys. A rejected candidate is warned about by
    name and reason; a corrupt newest is renamed to ``.pt.corrupt``.

    Args:
        output: the run's output folder.
        rank: global rank whose shard to load.
        map_location: passed to ``torch.load``.
        global_step: if given, accept only a checkpoint at this step (for ranks that must agree
            on the step they resume from); others are skipped but left in place.
        run_id: if given, accept only a checkpoint of this run (or one written before run ids,
            which names none): another run's file is skipped, never a fallback, and named
            with its run in the error.

    Returns:
        ``(state, path)``: the checkpoint dict and the file it came from.

    Raises:
        CheckpointError: no candidate is usable; the message names every file tried and why.
    """
    tried: list[str] = []
    for index, path in enumerate(
        (checkpoint_path(output, rank), previous_checkpoint_path(output, rank))
    ):
        partner = (previous_checkpoint_path if index == 0 else checkpoint_path)(output, rank)
        if not os.path.isfile(path):
            tried.append(f"{path}: does not exist")
            continue
        other = _other_run(sidecar_run_id(path), run_id)
        if other:  # known from the sidecar: its tensors are not read
            header = read_header(path)
            at = f" at global step {header['global_step']}" if header else ""
            tried.append(f"{path}: {other}{at}")
            continue
        try:
            verified = verify(path, partner)
        except ValueError as err:
            reason = f"{path}: corrupt, {err}"
            logger.warning("checkpoint %s; %s", reason, _NEXT[index])
            tried.append(reason)
            if index == 0:
                _quarantine(path)
            continue
        if not verified and not os.path.exists(checksum_path(path)):
            # (A damaged sidecar has been warned about by verify.)
            warn_unverified(path, origin=" (written by arcface_torch or an older otface)")
        try:
            ckpt = load_checkpoint(path, map_location=map_location)
        except CheckpointError as err:
            logger.warning("checkpoint %s; %s", err, _NEXT[index])
            tried.append(str(err))
            continue
        other = _other_run(ckpt.get("run_id"), run_id)
        if other:
            tried.append(f"{path}: {other} at global step {ckpt['global_step']}")
            continue
        if global_step is not None and int(ckpt["global_step"]) != global_step:
            tried.append(f"{path}: at global_step {ckpt['global_step']}, not {global_step}")
            continue
        if tried:
            logger.warning("resuming from %s instead (%s)", path, "; ".join(tried))
        return LoadedCheckpoint(ckpt, path)
    hint = ""
    if all(t.endswith("does not exist") for t in tried):
        hint = (
            "; checkpoints are written when save_all_states = True (at the end of each epoch, "
            "and every save_every_steps steps)"
        )
    whose = f" of run {run_id}" if run_id else ""
    raise CheckpointError(
        f"no usable checkpoint{whose} for rank {rank} in {output}: {'; '.join(tried)}{hint}"
    )


def read_header(path: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` with its tensors memory-mapped (nothing read); ``None`` if it
    cannot be opened (missing, truncated: :func:`load_latest_checkpoint` says why when it
    tries it)."""
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a candidate
        return None
    return state if isinstance(state, dict) and "global_step" in state else None


def _other_run(found: Any, expected: str | None) -> str:
    """Why a checkpoint of run ``found`` is not one of run ``expected`` (``""`` when it may be
    used: the same run, no run expected, or a file that names none)."""
    if not expected or not found or str(found) == expected:
        return ""
    return f"belongs to another run ({found}), not to run {expected}, so it is not used"


def remove_stale_temp_files(output: str, *, rank: int | None = None) -> list[str]:
    """Delete temp files left in ``output`` by saves that were killed; call before any save.

    Only regular files named like the temp files of this module's saves are removed:
    ``.checkpoint_gpu_{r}.pt.XXXXXXXX.tmp``, ``.checkpoint_gpu_{r}.pt.sha256.XXXXXXXX.tmp`` and
    ``.model.pt.XXXXXXXX.tmp``.

    Args:
        output: the run's output folder (a missing folder has nothing to remove).
        rank: if given, only this rank's checkpoint temp files (and ``model.pt``'s for rank 0,
            which writes it), so each rank can clean up after itself.

    Returns:
        The paths removed, sorted.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(output))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        if rank is not None:
            mine = int(match["rank"]) == rank if match["rank"] is not None else rank == 0
            if not mine:
                continue
        unlink_quietly(entry.path)
        removed.append(entry.path)
    if removed:
        logger.warning(
            "removed %d temp file(s) of interrupted saves: %s",
            len(removed),
            ", ".join(os.path.basename(p) for p in sorted(removed)),
        )
    return sorted(removed)
