"""InsightFace RecordIO's record format: the framing of one record and its image payload.

The reader (:mod:`otface.data.recordio`) and the writer (:mod:`otface.data.rec_writer`) both
build on this module; neither imports the other. See :mod:`otface.data.recordio` for the file
layout.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

__all__ = [
    "MAGIC",
    "IRHeader",
    "RecordIOError",
    "and_more",
    "decode_record",
    "encode_record",
    "pack_payload",
    "unpack_payload",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IR = struct.Struct("<IfQQ")
_WORD = struct.Struct("<II")


class RecordIOError(ValueError):
    """A RecordIO file is malformed: the message names the file and the record key."""


def and_more(count: int, what: str) -> str:
    """``" (3 more lines too)"``: the end of an error message that names the first of several
    defects; empty when ``count`` is 0."""
    return f" ({count} more {what}{'s' if count > 1 else ''} too)" if count > 0 else ""


class IRHeader(NamedTuple):
    """Image-record header.

    Attributes:
        flag: number of float32 labels stored after the header (0: the scalar ``label`` is used).
        label: the scalar label (``flag == 0``) or a float32 array of ``flag`` labels.
        id: first record id (im2rec writes the record key here).
        id2: second record id.
    """

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_payload(
    label: float | np.ndarray | list, image: bytes, *, id: int = 0, id2: int = 0
) -> bytes:
    """Builds a record payload: header, optional float32 labels, then the image bytes.

    Args:
        label: a scalar label (``flag = 0``) or a sequence of labels (``flag = len(label)``).
        image: the encoded image (may be empty, as in identity records).
        id: header ``id`` field.
        id2: header ``id2`` field.
    """
    if np.ndim(label) == 0:
        return _IR.pack(0, float(label), id, id2) + bytes(image)
    labels = np.asarray(label, dtype="<f4").ravel()
    return _IR.pack(labels.size, 0.0, id, id2) + labels.tobytes() + bytes(image)


def unpack_payload(payload: bytes, *, where: str = "record") -> tuple[IRHeader, bytes]:
    """Splits a record payload into its :class:`IRHeader` and the image bytes."""
    if len(payload) < _IR.size:
        raise RecordIOError(
            f"{where}: payload of {len(payload)} bytes is shorter than the {_IR.size}-byte header"
        )
    flag, label, id_, id2 = _IR.unpack_from(payload)
    body = payload[_IR.size :]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(
                f"{where}: header announces {flag} labels but only {len(body)} bytes follow"
            )
        label = np.frombuffer(body, dtype="<f4", count=flag).astype(np.float32)
        body = body[4 * flag :]
    return IRHeader(int(flag), label, int(id_), int(id2)), body


def encode_record(payload: bytes) -> bytes:
    """Frames ``payload`` as RecordIO bytes, splitting it where it contains the magic word."""
    if len(payload) >= 1 << 29:
        raise RecordIOError(f"record payload of {len(payload)} bytes exceeds the 2**29 - 1 limit")
    parts: list[bytes] = []
    start = 0
    # Only 4-byte aligned occurrences are split, as in the reference writer.
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            cflag = 1 if start == 0 else 2
            parts.append(_WORD.pack(MAGIC, cflag << 29 | (pos - start)) + payload[start:pos])
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    cflag = 3 if start > 0 else 0
    tail = payload[start:]
    parts.append(_WORD.pack(MAGIC, cflag << 29 | len(tail)) + tail + b"\0" * (-len(tail) % 4))
    return b"".join(parts)


def decode_record(buf: bytes, *, where: str) -> bytes:
    """Joins the parts of the record starting at ``buf[0]``; ``buf`` may extend past it."""
    out: list[bytes] = []
    pos = 0
    while True:
        if len(buf) - pos < 8:
            raise RecordIOError(f"{where}: truncated (record header cut at byte {pos})")
        magic, lrecord = _WORD.unpack_from(buf, pos)
        if magic != MAGIC:
            raise RecordIOError(
                f"{where}: bad magic 0x{magic:08x} at byte {pos} of the record "
                f"(expected 0x{MAGIC:08x})"
            )
        cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
        if cflag > 3 or (pos == 0 and cflag not in (0, 1)) or (pos > 0 and cflag not in (2, 3)):
            raise RecordIOError(f"{where}: unexpected continuation flag {cflag} at byte {pos}")
        padded = length + (-length % 4)
        if len(buf) - pos - 8 < padded:
            raise RecordIOError(
                f"{where}: truncated (part of {length} bytes, {len(buf) - pos - 8} available)"
            )
        out.append(buf[pos + 8 : pos + 8 + length])
        pos += 8 + padded
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(out)
