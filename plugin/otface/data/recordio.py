"""InsightFace RecordIO (``train.rec`` / ``train.idx`` / ``property``) without mxnet.

File layout (the dmlc/mxnet RecordIO framing). A record is stored as one or more parts::

    uint32 magic = 0xced7230a
    uint32 lrecord = cflag << 29 | length      (cflag in the upper 3 bits, length in the lower 29)
    length bytes of payload, then zero padding to a multiple of 4 bytes

``cflag`` is 0 for a whole record, 1/2/3 for the first/middle/last part of a record that was
split where its payload contained the magic word at a 4-byte aligned position; the reader joins
the parts, putting the magic word back between them. All words are little-endian.

A payload starts with an image-record header ``struct "IfQQ"`` (flag, label, id, id2). When
``flag > 0``, ``flag`` float32 labels follow the header and ``label`` is unused. The rest of the
payload is the encoded image (JPEG/PNG).

The ``.idx`` file has one line per record, ``"key\\toffset"``, the byte offset of the record's
first part in the ``.rec`` file.

InsightFace's training sets (MS1M, Glint360K, WebFace) carry **header-0 identity ranges**:
record 0 has labels ``(first_identity_key, end_identity_key)``; images are keys
``1 .. first_identity_key - 1``; record ``first_identity_key + c`` has labels ``(start, end)``:
the image keys of identity ``c``. Files written by mxnet's ``im2rec`` have no such record and
every image record carries its own label.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "MAGIC",
    "IRHeader",
    "RecordIOError",
    "IndexedRecordReader",
    "encode_record",
    "pack_payload",
    "unpack_payload",
    "decode_record",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IR = struct.Struct("<IfQQ")
_WORD = struct.Struct("<II")


class RecordIOError(ValueError):
    """A RecordIO file is malformed: the message names the file and the record key."""


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


class IndexedRecordReader:
    """Random access to the records of a ``.rec`` file through its ``.idx`` file.

    The file is opened lazily and reopened after a ``fork`` (the owning process id is checked),
    so one instance can be shared with DataLoader workers.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: the ``.idx`` file; defaults to ``rec_path`` with suffix ``.idx``.

    Raises:
        FileNotFoundError: a file is missing (the message names it).
        RecordIOError: a malformed ``.idx`` line or an offset past the end of the ``.rec`` file.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = (
            Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        )
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        if not self.idx_path.is_file():
            raise FileNotFoundError(
                f"index file not found: {self.idx_path} (needed for random access to "
                f"{self.rec_path})"
            )
        self.keys, self._offsets = _read_index(self.idx_path)
        file_size = self.rec_path.stat().st_size
        bad = np.flatnonzero(self._offsets + 8 > file_size)
        if bad.size:
            k = int(bad[0])
            raise RecordIOError(
                f"{self.idx_path}: key {int(self.keys[k])} has offset {int(self._offsets[k])}, "
                f"past the end of {self.rec_path} ({file_size} bytes)"
            )
        # Byte span of each record: up to the next record's offset (or the end of the file).
        order = np.argsort(self._offsets, kind="stable")
        ends = np.empty_like(self._offsets)
        ends[order[:-1]] = self._offsets[order[1:]]
        if order.size:
            ends[order[-1]] = file_size
        self._spans = ends - self._offsets
        if self.keys.size and np.array_equal(self.keys, np.arange(self.keys.size)):
            self._position: dict[int, int] | None = None  # key == position
        else:
            self._position = {int(k): i for i, k in enumerate(self.keys)}
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.keys.size)

    def __contains__(self, key: int) -> bool:
        if self._position is None:
            return 0 <= key < self.keys.size
        return key in self._position

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        """Closes the file descriptor if this process opened it."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._pid = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def _locate(self, key: int) -> int:
        if self._position is None:
            if not 0 <= key < self.keys.size:
                raise KeyError(f"{self.idx_path}: no record with key {key}")
            return int(key)
        try:
            return self._position[int(key)]
        except KeyError:
            raise KeyError(f"{self.idx_path}: no record with key {key}") from None

    def _pread(self, offset: int, size: int) -> bytes:
        fd = self._descriptor()
        if hasattr(os, "pread"):
            return os.pread(fd, size, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)

    def read(self, key: int) -> bytes:
        """Returns the payload of record ``key`` (all parts joined)."""
        i = self._locate(key)
        buf = self._pread(int(self._offsets[i]), int(self._spans[i]))
        return decode_record(buf, where=f"{self.rec_path}, record key {key}")

    def read_header(self, key: int) -> IRHeader:
        """Returns only the :class:`IRHeader` of record ``key`` (reads a few dozen bytes)."""
        i = self._locate(key)
        where = f"{self.rec_path}, record key {key}"
        head = self._pread(int(self._offsets[i]), min(int(self._spans[i]), 8 + _IR.size))
        if len(head) >= 8 + _IR.size:
            magic, lrecord = _WORD.unpack_from(head)
            flag = _IR.unpack_from(head, 8)[0]
            need = 8 + _IR.size + 4 * flag
            if magic == MAGIC and lrecord >> 29 == 0 and (lrecord & _LENGTH_MASK) >= need - 8:
                if flag:
                    head = self._pread(int(self._offsets[i]), need)
                # A whole (single-part) record: the header bytes are contiguous.
                return unpack_payload(head[8:need], where=where)[0]
        return unpack_payload(self.read(key), where=where)[0]


def _read_index(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    # Fast path: one vectorised parse of the whole file (MS1MV3's 5.2M lines in ~0.2 s). Any
    # irregularity falls through to the line-by-line parser, which names the bad line.
    text = Path(idx_path).read_text(encoding="ascii", errors="replace")
    try:
        flat = np.fromstring(text, dtype=np.int64, sep=" ")
    except ValueError:
        flat = None
    # Each record is "key<TAB>offset": as many tabs as pairs of numbers.
    if flat is not None and flat.size % 2 == 0 and flat.size // 2 == text.count("\t"):
        key_arr, off_arr = flat[0::2].copy(), flat[1::2].copy()
        if not off_arr.size or off_arr.min() >= 0:
            return key_arr, off_arr
    return _read_index_lines(idx_path)


def _read_index_lines(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    keys: list[int] = []
    offsets: list[int] = []
    with open(idx_path, encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split("\t")
            try:
                if len(fields) != 2:
                    raise ValueError
                keys.append(int(fields[0]))
                offsets.append(int(fields[1]))
            except ValueError:
                raise RecordIOError(
                    f"{idx_path}, line {line_no}: expected 'key<TAB>offset', got {line[:80]!r}"
                ) from None
    key_arr = np.asarray(keys, dtype=np.int64)
    off_arr = np.asarray(offsets, dtype=np.int64)
    if off_arr.size and off_arr.min() < 0:
        k = int(np.argmin(off_arr))
        raise RecordIOError(f"{idx_path}: key {keys[k]} has negative offset {offsets[k]}")
    return key_arr, off_arr


def __getattr__(name: str):
    # The writer lives in its own module; it is also reachable from here.
    if name in ("write_rec", "WrittenRec"):
        from otface.data import rec_writer

        return getattr(rec_writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
