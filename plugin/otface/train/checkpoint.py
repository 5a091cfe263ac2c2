"""Checksummed, rotated, atomic checkpoint files in arcface_torch's layout.

``model.pt`` is the backbone's ``state_dict``. ``checkpoint_gpu_{rank}.pt`` holds ``epoch``,
``global_step``, ``state_dict_backbone``, ``state_dict_softmax_fc``, ``state_optimizer``,
``state_lr_scheduler`` (upstream's keys) plus ``epoch_step`` (batches done in ``epoch``),
``state_grad_scaler``, ``rng_state``, ``skipped_steps``, and for resuming on another number of
ranks ``world_size``, ``total_batch_size`` and ``lr_schedule`` (ours). Both stay plain
``torch.save`` files that arcface_torch reads.

Every file is written to a temporary ``.NAME.XXXXXXXX.tmp`` beside it, fsynced and renamed over
the old one, so a kill never leaves a truncated file under a real name. For the training
checkpoint, :func:`save_checkpoint` adds two things:

* **Checksum.** The SHA-256 and size of the bytes are computed while ``torch.save`` writes them
  (no re-read of a multi-GB Partial-FC shard) and stored in a sidecar ``NAME.sha256`` (one line,
  ``<hex digest>  <size in bytes>``); the ``.pt`` itself is unchanged for upstream readers.
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
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import tempfile
from typing import Any, Callable, NamedTuple

import torch

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

_CHUNK_BYTES = 8 << 20
# Temp names made by _write_temp (tempfile.mkstemp: "." + target name + "." + random + ".tmp").
_TEMP_RE = re.compile(
    r"^\.(?:checkpoint_gpu_(?P<rank>\d+)(?:\.prev)?\.pt(?:\.sha256)?|(?P<model>model\.pt))"
    r"\.[A-Za-z0-9_]+\.tmp$"
)
_warned_unverified: set[str] = set()
_NEXT = ("trying the previous one", "no older checkpoint is kept")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or cannot be written; the message names the file."""


class FileDigest(NamedTuple):
    """SHA-256 (hex) and size of a file's bytes."""

    sha256: str
    size_bytes: int


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


def checksum_path(path: str) -> str:
    """Sidecar holding the SHA-256 and size of ``path``: ``path + ".sha256"``."""
    return path + ".sha256"


def model_path(output: str) -> str:
    """Backbone weights for inference and export: ``output/model.pt``."""
    return os.path.join(output, "model.pt")


class _HashingWriter:
    """File-like ``write`` that hashes and counts the bytes it passes to ``raw``.

    ``torch.save`` swallows an exception raised by ``write`` into a RuntimeError about the zip
    position, so the first ``OSError`` is kept in ``error`` for the caller to report.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size_bytes = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        if self.error is not None:
            raise self.error
        view = memoryview(data)
        try:
            written = self._raw.write(view)
        except OSError as err:
            self.error = err
            raise
        self._hash.update(view)
        self.size_bytes += view.nbytes
        return written

    def flush(self) -> None:
        self._raw.flush()

    def digest(self) -> FileDigest:
        return FileDigest(self._hash.hexdigest(), self.size_bytes)


def _fsync_dir(folder: str) -> None:
    """Make renames in ``folder`` durable (no-op where directories cannot be opened)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(src: str, dst: str) -> None:
    os.replace(src, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_error(path: str, err: OSError) -> CheckpointError:
    code = errno.errorcode.get(err.errno or 0, "")
    why = f"{err.strerror} ({code})" if err.strerror else str(err)
    return CheckpointError(
        f"cannot write {path}: {why}; the existing {os.path.basename(path)} was left as it was"
    )


def _write_temp(path: str, write: Callable[[Any], Any]) -> tuple[str, FileDigest]:
    """Write through ``write(file)`` to a fsynced temp file beside ``path``; return its digest.

    On any failure the temp file is removed; an ``OSError`` (full disk, unwritable folder)
    becomes a :class:`CheckpointError` naming ``path``, other exceptions pass unchanged.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    writer = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder
        )
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        return tmp, writer.digest()
    except BaseException as err:
        if tmp is not None:
            _unlink_quietly(tmp)
        cause = writer.error if writer is not None and writer.error is not None else err
        if isinstance(cause, OSError):
            raise _write_error(path, cause) from cause
        raise


def atomic_save(obj: Any, path: str) -> FileDigest:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    Returns:
        The SHA-256 and size of the bytes written, computed while writing.

    Raises:
        CheckpointError: the file cannot be written (e.g. no space left on device); ``path``
            is left as it was and no temp file remains.
    """
    tmp, digest = _write_temp(path, lambda f: torch.save(obj, f))
    try:
        _replace(tmp, path)
    except OSError as err:
        _unlink_quietly(tmp)
        raise _write_error(path, err) from err
    return digest


def _write_checksum(path: str, digest: FileDigest) -> None:
    """Atomically publish the sidecar of ``path``."""
    line = f"{digest.sha256}  {digest.size_bytes}\n".encode("ascii")
    sidecar = checksum_path(path)
    tmp, _ = _write_temp(sidecar, lambda f: f.write(line))
    try:
        _replace(tmp, sidecar)
    except BaseException:
        _unlink_quietly(tmp)
        raise


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
    tmp, digest = _write_temp(newest, lambda f: torch.save(state, f))
    step = newest
    try:
        if os.path.exists(newest):
            step = previous
            if os.path.exists(checksum_path(newest)):
                _replace(newest, previous)  # still verified through .pt.sha256 (its partner)
                _replace(checksum_path(newest), checksum_path(previous))
            else:  # unverifiable upstream/legacy file: the old .prev sidecar must not follow it
                _unlink_quietly(checksum_path(previous))
                _replace(newest, previous)
        # With no newest (first save, or the last one was interrupted or quarantined) the
        # previous checkpoint is the good one and stays; a stale .pt.sha256 is replaced.
        step = checksum_path(newest)
        _write_checksum(newest, digest)
        step = newest
        _replace(tmp, newest)
    except BaseException as err:
        _unlink_quietly(tmp)
        if isinstance(err, OSError):
            raise _write_error(step, err) from err
        raise
    return newest


def save_verified(obj: Any, path: str) -> FileDigest:
    """:func:`atomic_save` plus a ``path.sha256`` sidecar (the checkpoints' checksum rule) for a
    file that is not rotated. An old sidecar is removed first, so a kill in between leaves a
    file that loads unverified, never one that reads as corrupt."""
    _unlink_quietly(checksum_path(path))
    digest = atomic_save(obj, path)
    _write_checksum(path, digest)
    return digest


def load_verified(path: str, *, map_location: Any = "cpu") -> Any:
    """``torch.load`` of ``path`` after checking it against its sidecar (warns once when it has
    none).

    Raises:
        CheckpointError: missing, corrupt or unreadable; the message names the file and why.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    try:
        verified = _verify(path, path)
    except ValueError as err:
        raise CheckpointError(f"{path}: corrupt, {err}") from None
    if not verified and path not in _warned_unverified:
        _warned_unverified.add(path)
        logger.warning("%s has no checksum file: it cannot be verified", path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err


def _read_checksum(path: str) -> FileDigest | None:
    """The record in ``path``'s sidecar; ``None`` when there is none. Raises ValueError if bad."""
    sidecar = checksum_path(path)
    try:
        with open(sidecar, encoding="ascii") as f:
            text = f.read(256)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"checksum file {sidecar} cannot be read ({err})") from err
    fields = text.split()
    if len(fields) != 2 or not re.fullmatch(r"[0-9a-f]{64}", fields[0]) or not fields[1].isdigit():
        raise ValueError(f"checksum file {sidecar} is malformed ({text[:80]!r})")
    return FileDigest(fields[0], int(fields[1]))


def _file_digest(path: str) -> FileDigest:
    """Streamed SHA-256 of a file of any size."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(_CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return FileDigest(h.hexdigest(), size)


def _verify(path: str, partner: str) -> bool:
    """``True`` if ``path`` matches its checksum, ``False`` if it has none to match.

    Raises:
        ValueError: it is corrupt (size or SHA-256 differs from its checksum file), or its
            checksum file is unreadable; the message says which.
    """
    try:
        own = _read_checksum(path)
        own_error = None
    except ValueError as err:
        own, own_error = None, err
    try:
        other = _read_checksum(partner)
    except ValueError:
        other = None
    records = [r for r in (own, other) if r is not None]
    size = os.path.getsize(path)
    actual = _file_digest(path) if any(r.size_bytes == size for r in records) else None
    if actual is not None and actual in records:
        return True
    if own_error is not None:
        raise own_error
    if own is None:
        return False  # written without a checksum; a partner record is for a different file
    if actual is None or own.size_bytes != size:
        raise ValueError(
            f"is {size} bytes but {checksum_path(path)} records {own.size_bytes} "
            "(truncated or overwritten)"
        )
    raise ValueError(
        f"SHA-256 {actual.sha256[:16]}... does not match {own.sha256[:16]}... recorded in "
        f"{checksum_path(path)} (bytes changed after it was written)"
    )


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
        try:
            verified = _verify(path, partner)
        except ValueError as err:
            reason = f"{path}: corrupt, {err}"
            logger.warning("checkpoint %s; %s", reason, _NEXT[index])
            tried.append(reason)
            if index == 0:
                _quarantine(path)
            continue
        if not verified and path not in _warned_unverified:
            _warned_unverified.add(path)
            logger.warning(
                "%s has no checksum file (written by arcface_torch or an older otface): "
                "it cannot be verified",
                path,
            )
        try:
            ckpt = load_checkpoint(path, map_location=map_location)
        except CheckpointError as err:
            logger.warning("checkpoint %s; %s", err, _NEXT[index])
            tried.append(str(err))
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
    raise CheckpointError(
        f"no usable checkpoint for rank {rank} in {output}: {'; '.join(tried)}{hint}"
    )


def remove_stale_temp_files(output: str, *, rank: int | None = None) -> list[str]:
    """Delete temp files left in ``output`` by saves that were killed; call before any save.

    Only regular files named like this module's temp files are removed:
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
        _unlink_quietly(entry.path)
        removed.append(entry.path)
    if removed:
        logger.warning(
            "removed %d temp file(s) of interrupted saves: %s",
            len(removed),
            ", ".join(os.path.basename(p) for p in sorted(removed)),
        )
    return sorted(removed)
