"""Files that are never half-written and can be checked: atomic writes and SHA-256 sidecars.

Every file is written to a temporary ``.NAME.XXXXXXXX.tmp`` beside it, fsynced and renamed over
the old one, so a kill never leaves a truncated file under a real name. The SHA-256 and size of
the bytes are computed while ``torch.save`` writes them (no re-read of a multi-GB Partial-FC
shard) and can be stored in a sidecar ``NAME.sha256`` (one line, ``<hex digest>  <size in
bytes>  <check>``, or ``<hex digest>  <size in bytes>  <check>  <run id>`` for a training
checkpoint, where ``<check>`` is the first 16 hex digits of the SHA-256 of the other fields
joined by two spaces); the file itself is unchanged for readers that know nothing of
sidecars.

The sidecar vouches for itself: a sidecar whose own check fails, or that cannot be parsed, is
damaged, and says nothing about its file, which then loads with a warning that it could not be
verified (rather than being set aside as corrupt). Sidecars of two fields (older otface) are
still read, without that self-check.

A file counts as verified when its size and digest match its own sidecar or its *partner's*:
the training checkpoints are rotated in pairs, and during a rotation a file can be described by
its partner's sidecar for a moment (:mod:`otface.train.checkpoint`). A file with no sidecar
(written by arcface_torch or an older otface) loads with a one-time warning that it cannot be
verified.
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
    "DamagedSidecar",
    "FileDigest",
    "atomic_save",
    "cannot_write",
    "checksum_path",
    "durable_replace",
    "load_verified",
    "save_verified",
    "sidecar_run_id",
    "unlink_quietly",
    "verify",
    "warn_unverified",
    "write_checksum",
    "write_temp",
]

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 8 << 20
_warned_unverified: set[str] = set()


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or cannot be written; the message names the file."""


class FileDigest(NamedTuple):
    """SHA-256 (hex) and size of a file's bytes."""

    sha256: str
    size_bytes: int


def checksum_path(path: str) -> str:
    """Sidecar holding the SHA-256 and size of ``path``: ``path + ".sha256"``."""
    return path + ".sha256"


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


def durable_replace(src: str, dst: str) -> None:
    """``os.replace(src, dst)``, then fsync the folder so that the rename survives a crash."""
    os.replace(src, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def unlink_quietly(path: str) -> None:
    """Delete ``path``; one that is already gone is not an error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def cannot_write(path: str, err: OSError) -> CheckpointError:
    """The one-line error for a failed write or rename of ``path``, with the OS's reason."""
    code = errno.errorcode.get(err.errno or 0, "")
    why = f"{err.strerror} ({code})" if err.strerror else str(err)
    kept = (
        f"the existing {os.path.basename(path)} was left as it was"
        if os.path.exists(path)
        else f"there was no {os.path.basename(path)} before, and none was written"
    )
    return CheckpointError(f"cannot write {path}: {why}; {kept}")


def write_temp(path: str, write: Callable[[Any], Any]) -> tuple[str, FileDigest]:
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
            unlink_quietly(tmp)
        cause = writer.error if writer is not None and writer.error is not None else err
        if isinstance(cause, OSError):
            raise cannot_write(path, cause) from cause
        raise


def atomic_save(obj: Any, path: str) -> FileDigest:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    Returns:
        The SHA-256 and size of the bytes written, computed while writing.

    Raises:
        CheckpointError: the file cannot be written (e.g. no space left on device); ``path``
            is left as it was and no temp file remains.
    """
    tmp, digest = write_temp(path, lambda f: torch.save(obj, f))
    try:
        durable_replace(tmp, path)
    except OSError as err:
        unlink_quietly(tmp)
        raise cannot_write(path, err) from err
    return digest


def _self_check(record: str) -> str:
    return hashlib.sha256(record.encode("ascii")).hexdigest()[:16]


def write_checksum(path: str, digest: FileDigest, *, run_id: str | None = None) -> None:
    """Atomically publish the sidecar of ``path`` (with its own check), naming ``run_id``
    when given (:mod:`otface.train.identity`)."""
    fields = [digest.sha256, str(digest.size_bytes)]
    check = _self_check("  ".join([*fields, run_id] if run_id else fields))
    line = ("  ".join([*fields, check, *([run_id] if run_id else [])]) + "\n").encode("ascii")
    sidecar = checksum_path(path)
    tmp, _ = write_temp(sidecar, lambda f: f.write(line))
    try:
        durable_replace(tmp, sidecar)
    except BaseException:
        unlink_quietly(tmp)
        raise


def save_verified(obj: Any, path: str) -> FileDigest:
    """:func:`atomic_save` plus a ``path.sha256`` sidecar (the checkpoints' checksum rule) for a
    file that is not rotated. An old sidecar is removed first, so a kill in between leaves a
    file that loads unverified, never one that reads as corrupt."""
    unlink_quietly(checksum_path(path))
    digest = atomic_save(obj, path)
    write_checksum(path, digest)
    return digest


def warn_unverified(path: str, *, origin: str = "") -> None:
    """Warn, once per path in this process, that ``path`` has no sidecar to check it against.

    ``origin`` (e.g. ``" (written by arcface_torch or an older otface)"``) follows "has no
    checksum file" in the message.
    """
    if path in _warned_unverified:
        return
    _warned_unverified.add(path)
    logger.warning("%s has no checksum file%s: it cannot be verified", path, origin)


def load_verified(path: str, *, map_location: Any = "cpu") -> Any:
    """``torch.load`` of ``path`` after checking it against its sidecar (warns once when it has
    none).

    Raises:
        CheckpointError: missing, corrupt or unreadable; the message names the file and why.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    try:
        verified = verify(path, path)
    except ValueError as err:
        raise CheckpointError(f"{path}: corrupt, {err}") from None
    if not verified and not os.path.exists(checksum_path(path)):
        warn_unverified(path)  # (a damaged sidecar has been warned about by verify)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err


class DamagedSidecar(ValueError):
    """A sidecar that fails its own check or cannot be parsed: it vouches for nothing."""


def _read_checksum(path: str) -> FileDigest | None:
    """The record in ``path``'s sidecar; ``None`` when there is none.

    Raises:
        DamagedSidecar: the sidecar fails its own check, or cannot be parsed.
        ValueError: the sidecar cannot be read.
    """
    fields = _sidecar_fields(path)
    return None if fields is None else FileDigest(fields[0], int(fields[1]))


def sidecar_run_id(path: str) -> str | None:
    """The run id recorded in ``path``'s sidecar; ``None`` when it has no sidecar, a sidecar
    without an id (older otface) or a damaged one."""
    try:
        fields = _sidecar_fields(path)
    except ValueError:
        return None
    return fields[3] if fields is not None and len(fields) == 4 else None


def _sidecar_fields(path: str) -> list[str] | None:
    """The checked fields of ``path``'s sidecar (digest, size, then the check and run id when
    present); ``None`` when there is none. Raises as :func:`_read_checksum`."""
    sidecar = checksum_path(path)
    try:
        with open(sidecar, "rb") as f:
            raw = f.read(256)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ValueError(f"checksum file {sidecar} cannot be read ({err})") from err
    try:
        fields = raw.decode("ascii").split()
    except UnicodeDecodeError:
        fields = []
    well_formed = (
        len(fields) in (2, 3, 4)
        and re.fullmatch(r"[0-9a-f]{64}", fields[0]) is not None
        and fields[1].isdigit()
    )
    if not well_formed:
        raise DamagedSidecar(f"checksum file {sidecar} is damaged (cannot be parsed)")
    if len(fields) > 2 and fields[2] != _self_check("  ".join(fields[:2] + fields[3:])):
        raise DamagedSidecar(f"checksum file {sidecar} is damaged (its own check fails)")
    return fields


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


def verify(path: str, partner: str) -> bool:
    """``True`` if ``path`` matches its checksum (or ``partner``'s), ``False`` if it has none to
    match.

    Raises:
        ValueError: it is corrupt (size or SHA-256 differs from its checksum file), or its
            checksum file is unreadable; the message says which.
    """
    own_error = None
    try:
        own = _read_checksum(path)
    except DamagedSidecar as err:
        own, own_error = None, err
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
    if isinstance(own_error, DamagedSidecar):
        # The sidecar is what is broken: the file is not condemned on its word.
        logger.warning("%s; %s is used without verification", own_error, path)
        return False
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
