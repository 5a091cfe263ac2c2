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

import mmap
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "MAGIC",
    "IRHeader",
    "RecordIOError",
    "IndexedRecordReader",
    "RecordHeaders",
    "RecordScan",
    "encode_record",
    "pack_payload",
    "unpack_payload",
    "decode_record",
]

from otface.data.record_format import (  # noqa: F401 - re-exported
    _IR,
    _LENGTH_MASK,
    _MAGIC_BYTES,
    _WORD,
    MAGIC,
    IRHeader,
    RecordIOError,
    decode_record,
    encode_record,
    pack_payload,
    unpack_payload,
)


class RecordHeaders(NamedTuple):
    """Header fields of records, as :meth:`IndexedRecordReader.scan` finds them (one row each).

    Attributes:
        offset: int64 byte offset of the record in the ``.rec`` file.
        flag: int64 header ``flag`` (the number of float labels); -1 where no whole or first
            record part starts at ``offset`` (only in :attr:`RecordScan.unindexed`).
        label: float32, the scalar ``label`` (``flag == 0``) or the first float label.
        range: float32 ``(n, 2)``, the first two float labels, NaN where ``flag < 2``: the
            ``(start, end)`` key range of record 0 and of identity records (header-0 layout).
        id: uint64 header ``id``.
        image_bytes: int64 payload bytes after the header and its labels (0 in identity
            records); -1 where unknown.
    """

    offset: np.ndarray
    flag: np.ndarray
    label: np.ndarray
    range: np.ndarray
    id: np.ndarray
    image_bytes: np.ndarray


class RecordScan(NamedTuple):
    """What one pass over a ``.rec`` file's framing words found.

    Attributes:
        records: one row per ``.idx`` line, in index order.
        unindexed: one row per byte range of the ``.rec`` that no index line covers, describing
            the record that starts the range (``flag == -1`` when none does).
        unindexed_end: int64, the end of each such byte range.
    """

    records: RecordHeaders
    unindexed: RecordHeaders
    unindexed_end: np.ndarray


class IndexedRecordReader:
    """Random access to the records of a ``.rec`` file through its ``.idx`` file.

    The constructor parses the index and checks that its keys are unique and its offsets lie in
    the file; :meth:`scan` checks every offset against the records themselves (the data sets'
    label scan calls it at start-up). The file is opened lazily and reopened after a ``fork``
    (the owning process id is checked), so one instance can be shared with DataLoader workers.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: the ``.idx`` file; defaults to ``rec_path`` with suffix ``.idx``.

    Raises:
        FileNotFoundError: a file is missing (the message names it).
        RecordIOError: a malformed ``.idx`` line, a duplicate key or an offset past the end of
            the ``.rec`` file (the message names the line and the key).
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
        self.keys, self._offsets, self._lines = _read_index(self.idx_path)
        self.file_size = self.rec_path.stat().st_size
        n = self.keys.size
        by_key = np.argsort(self.keys, kind="stable")
        dup = np.flatnonzero(self.keys[by_key[1:]] == self.keys[by_key[:-1]])
        if dup.size:
            first, again = int(by_key[dup[0]]), int(by_key[dup[0] + 1])
            raise RecordIOError(
                f"{self._where(again)}: duplicate key (also on line {self._line_no(first)})"
            )
        bad = np.flatnonzero(self._offsets + 8 > self.file_size)
        if bad.size:
            i = int(bad[0])
            x = int(self._offsets[i])
            what = "is past the end" if x >= self.file_size else "leaves no room for a record"
            raise RecordIOError(
                f"{self._where(i)}: offset {x} {what} of {self.rec_path} ({self.file_size} "
                f"bytes): the .rec is truncated or the line is wrong{_more(bad.size - 1, 'line')}"
            )
        # Byte span of each record: up to the next record's offset (or the end of the file).
        order = np.argsort(self._offsets, kind="stable")
        ends = np.empty_like(self._offsets)
        ends[order[:-1]] = self._offsets[order[1:]]
        if order.size:
            ends[order[-1]] = self.file_size
        self._spans = ends - self._offsets
        # Key -> position: implicit when keys are 0..n-1 in order, a table when they are dense.
        self._position: dict[int, int] | None = None
        self._table: np.ndarray | None = None
        if not np.array_equal(self.keys, np.arange(n)):
            if self.keys.min() >= 0 and self.keys.max() < 2 * n + 1024:
                self._table = np.full(int(self.keys.max()) + 1, -1, dtype=np.int64)
                self._table[self.keys] = np.arange(n)
            else:
                self._position = dict(zip(self.keys.tolist(), range(n)))
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.keys.size)

    def __contains__(self, key: int) -> bool:
        return int(self.positions(np.asarray([key]))[0]) >= 0

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Index positions (``.idx`` line order, blank lines skipped) of ``keys``; -1 if absent."""
        keys = np.asarray(keys, dtype=np.int64)
        out = np.full(keys.shape, -1, dtype=np.int64)
        if self._position is not None:
            get = self._position.get
            return np.fromiter((get(k, -1) for k in keys.tolist()), np.int64, keys.size)
        size = self.keys.size if self._table is None else self._table.size
        ok = (keys >= 0) & (keys < size)
        out[ok] = keys[ok] if self._table is None else self._table[keys[ok]]
        return out

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

    def _line_no(self, i: int) -> int:
        return i + 1 if self._lines is None else int(self._lines[i])

    def _where(self, i: int) -> str:
        """``"<idx> line L, key K"`` for index position ``i``."""
        return f"{self.idx_path} line {self._line_no(i)}, key {int(self.keys[i])}"

    def _locate(self, key: int) -> int:
        i = int(self.positions(np.asarray([key]))[0])
        if i < 0:
            raise KeyError(f"{self.idx_path}: no record with key {key}")
        return i

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

    def scan(self) -> RecordScan:
        """Checks the index against the records and returns every record's header fields.

        One pass, in file order, over the first 40 bytes of each indexed record (framing words,
        image-record header, first two float labels) through a read-only memory map: about
        0.3 s per million records when the file is in the page cache, and otherwise bound by
        reading one page per record. Checked:

        * every offset starts a record: 4-byte aligned, the magic word, a whole or first part;
        * no two lines share an offset;
        * each record (all its parts) ends within the file and before the next indexed offset;
        * its payload holds the 24-byte header and the float labels the header announces;
        * each header ``id`` equals its key, when the file's writer stores keys there: when at
          least 99% of the records agree (im2rec, InsightFace's ``face2rec2`` and
          :func:`otface.data.rec_writer.write_rec` store every key). Files whose ids follow
          another rule skip this check.

        Byte ranges that no line covers are returned, not rejected (an index may list a subset
        of the records); whether a key is missing depends on the layout, which the label scan
        (:func:`otface.data.datasets.read_rec_labels`) knows.

        Raises:
            RecordIOError: the first defect, naming the ``.idx`` line, its key and what is wrong.
        """
        n, size = len(self), self.file_size
        order = np.argsort(self._offsets, kind="stable")
        off = self._offsets[order]
        same = np.flatnonzero(off[1:] == off[:-1])
        if same.size:
            raise self._shared_offset(order, off, same)
        words = _gather_words(self.rec_path, off, size)
        cflag = (words[:, 1] >> 29).astype(np.int64)
        payload = (words[:, 1] & _LENGTH_MASK).astype(np.int64)
        starts = (off % 4 == 0) & (words[:, 0] == MAGIC) & (cflag <= 1)
        ends = off + 8 + payload + (-payload % 4)
        for i in np.flatnonzero(starts & (cflag == 1)).tolist():
            ends[i], payload[i] = self._walk_parts(int(off[i]), where=self._where(int(order[i])))
        bad = np.flatnonzero(~starts)
        if bad.size:
            raise self._bad_start(order, off, words, bad, ends)
        nxt = np.append(off[1:], size)
        over = np.flatnonzero(ends > nxt)
        if over.size:
            i = int(over[0])
            where = self._where(int(order[i]))
            if i == n - 1:
                raise RecordIOError(
                    f"{where}: the record at byte {int(off[i])} needs bytes up to "
                    f"{int(ends[i])} but {self.rec_path} has {size} bytes: the .rec is truncated"
                )
            j = int(order[i + 1])
            raise RecordIOError(
                f"{where}: the record at byte {int(off[i])} runs to byte {int(ends[i])}, past "
                f"the start of key {int(self.keys[j])} (line {self._line_no(j)}) at byte "
                f"{int(off[i + 1])}: one of the two lines is wrong or the record is damaged"
            )
        heads = _header_fields(words, off, payload)
        # A first part too short to hold the header and two labels: join the parts (rare).
        first_part = (words[:, 1] & _LENGTH_MASK).astype(np.int64)
        for i in np.flatnonzero((cflag == 1) & (first_part < _IR.size + 8)).tolist():
            where = self._where(int(order[i]))
            body = decode_record(self._pread(int(off[i]), int(ends[i] - off[i])), where=where)
            _set_row(heads, i, body, where=where)
        short = np.flatnonzero(heads.image_bytes < 0)
        if short.size:
            i = int(short[np.argmin(order[short])])
            raise RecordIOError(
                f"{self._where(int(order[i]))}: the record at byte {int(off[i])} has a payload of "
                f"{int(payload[i])} bytes, too short for the {_IR.size}-byte header and the "
                f"{max(int(heads.flag[i]), 0)} labels it announces{_more(short.size - 1, 'record')}"
            )
        self._check_ids(order, heads)
        records = RecordHeaders(*(_unsort(a, order) for a in heads))
        gap_lo, gap_hi = _gaps(off, ends, size)
        gap_words = _gather_words(self.rec_path, gap_lo, size)
        room = gap_hi - gap_lo - 8
        gap_len = (gap_words[:, 1] & _LENGTH_MASK).astype(np.int64)
        whole = (gap_words[:, 0] == MAGIC) & (gap_words[:, 1] >> 29 == 0) & (gap_len <= room)
        gap_heads = _header_fields(gap_words, gap_lo, np.where(whole, gap_len, -1))
        gap_heads.flag[~whole | (gap_heads.image_bytes < 0)] = -1
        return RecordScan(records, gap_heads, gap_hi)

    def _walk_parts(self, offset: int, *, where: str) -> tuple[int, int]:
        """Follows the parts of a split record from ``offset``: ``(end byte, payload bytes)``."""
        pos, total = offset, -4
        while True:
            head = self._pread(pos, 8)
            if len(head) < 8:
                raise RecordIOError(
                    f"{where}: the record at byte {offset} is cut at byte {pos}, the end of "
                    f"{self.rec_path}: the .rec is truncated"
                )
            magic, lrecord = _WORD.unpack(head)
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            if magic != MAGIC or (pos > offset and cflag not in (2, 3)):
                raise RecordIOError(
                    f"{where}: the record at byte {offset} continues at byte {pos} with "
                    f"{'no RecordIO magic' if magic != MAGIC else f'part flag {cflag}'} "
                    "instead of a continuation part"
                )
            total += 4 + length  # the magic word between parts belongs to the payload
            pos += 8 + length + (-length % 4)
            if pos > self.file_size:
                raise RecordIOError(
                    f"{where}: the record at byte {offset} needs bytes up to {pos} but "
                    f"{self.rec_path} has {self.file_size} bytes: the .rec is truncated"
                )
            if cflag == 3:
                return pos, total

    def _bad_start(
        self,
        order: np.ndarray,
        off: np.ndarray,
        words: np.ndarray,
        bad: np.ndarray,
        ends: np.ndarray,
    ) -> RecordIOError:
        """The error for the first line (in file order of lines) whose offset starts no record."""
        i = int(bad[np.argmin(order[bad])])
        x, magic, cflag = int(off[i]), int(words[i, 0]), int(words[i, 1] >> 29)
        if x % 4:
            what = "is not a multiple of 4, so it starts no record (records are 4-byte aligned)"
        elif magic != MAGIC:
            what = f"does not start a record (no RecordIO magic there: 0x{magic:08x})"
        else:
            what = f"points at a continuation part (flag {cflag}), not at a record's start"
        is_good = np.ones(off.size, dtype=bool)
        is_good[bad] = False
        good = np.flatnonzero(is_good)
        j = int(np.searchsorted(off[good], x, side="right")) - 1
        if j >= 0 and x < ends[good[j]]:
            k = int(order[good[j]])
            inside = (
                f"; it points inside record key {int(self.keys[k])} (line {self._line_no(k)}, "
                f"bytes {int(off[good[j]])}..{int(ends[good[j]])})"
            )
        else:
            inside = "; no other line's record covers that byte"
        return RecordIOError(
            f"{self._where(int(order[i]))}: offset {x} {what}{inside}{_more(bad.size - 1, 'line')}"
        )

    def _shared_offset(self, order: np.ndarray, off: np.ndarray, same: np.ndarray) -> RecordIOError:
        """The error for two lines with one offset; the wrong one is the line whose key differs
        from the header id stored there, when one of them matches it."""
        x = int(off[same[0]])
        wrong, right = int(order[same[0] + 1]), int(order[same[0]])
        word = _gather_words(self.rec_path, off[same[0] : same[0] + 1], self.file_size)[0]
        stored = int(word[4]) | int(word[5]) << 32 if word[0] == MAGIC else None
        if stored is not None and stored == int(self.keys[wrong]):
            wrong, right = right, wrong
        whose = ", whose header id the record there carries" if stored == self.keys[right] else ""
        return RecordIOError(
            f"{self._where(wrong)}: offset {x} is also the offset of key "
            f"{int(self.keys[right])} (line {self._line_no(right)}){whose}; each line must point "
            f"at its own record{_more(same.size - 1, 'shared offset')}"
        )

    def _check_ids(self, order: np.ndarray, heads: RecordHeaders) -> None:
        keys = self.keys[order]
        agree = (keys >= 0) & (heads.id == keys.astype(np.uint64))
        n, n_agree = int(keys.size), int(agree.sum())
        if n_agree == n or n_agree < _ID_AGREEMENT * n:
            return
        wrong = np.flatnonzero(~agree)
        i = int(wrong[np.argmin(order[wrong])])
        raise RecordIOError(
            f"{self._where(int(order[i]))}: the record at byte {int(heads.offset[i])} carries "
            f"header id {int(heads.id[i])}, not its key ({n_agree} of {n} records carry their "
            "own key there, as im2rec and InsightFace's writers store it): the line points at "
            f"another record{_more(wrong.size - 1, 'record')}"
        )


_ID_AGREEMENT = 0.99  # share of records whose header id equals their key for ids to be checked
# Words read at each record: magic, lrecord, flag, label, id (2 words), two float labels (id2,
# words 6 and 7, is skipped).
_GATHER_STEPS = np.array([0, 1, 2, 3, 4, 5, 8, 9])
_GATHER_WORDS = _GATHER_STEPS.size
_GATHER_CHUNK = 1 << 18  # records per gather: bounds the index array to 16 MiB


def _more(count: int, what: str) -> str:
    return f" ({count} more {what}{'s' if count > 1 else ''} too)" if count > 0 else ""


def _unsort(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    out[order] = values
    return out


def _gather_words(rec_path: Path, offsets: np.ndarray, size: int) -> np.ndarray:
    """The little-endian words :data:`_GATHER_STEPS` at each (sorted) offset: uint32
    ``(n, 8)``. Words past the end of the file read as the file's last word."""
    out = np.zeros((offsets.size, _GATHER_WORDS), dtype=np.uint32)
    if not offsets.size or size < 4:
        return out
    with open(rec_path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # no mmap here (or a special file): one read per record
            return _gather_words_pread(f.fileno(), offsets)
        try:
            words = np.frombuffer(mm, dtype="<u4", count=min(size, len(mm)) // 4)
            try:
                for lo in range(0, offsets.size, _GATHER_CHUNK):
                    index = offsets[lo : lo + _GATHER_CHUNK, None] // 4 + _GATHER_STEPS
                    np.minimum(index, words.size - 1, out=index)
                    out[lo : lo + _GATHER_CHUNK] = words[index]
            finally:
                del words  # the map cannot close while a view of it exists
        finally:
            mm.close()
    return out


def _gather_words_pread(fd: int, offsets: np.ndarray) -> np.ndarray:
    size = 4 * (int(_GATHER_STEPS[-1]) + 1)
    buf = bytearray(offsets.size * size)
    for i, offset in enumerate(offsets.tolist()):
        os.lseek(fd, offset, os.SEEK_SET)
        chunk = os.read(fd, size)
        buf[i * size : i * size + len(chunk)] = chunk
    words = np.frombuffer(bytes(buf), dtype="<u4").reshape(offsets.size, -1)
    return words[:, _GATHER_STEPS].copy()


def _header_fields(words: np.ndarray, offsets: np.ndarray, payload: np.ndarray) -> RecordHeaders:
    """Header fields from gathered words; ``image_bytes`` < 0 where ``payload`` is too short."""
    flag = words[:, 2].astype(np.int64)
    scalar = words[:, 3].copy().view(np.float32)
    floats = words[:, 6:8].copy().view(np.float32)
    label = np.where(flag > 0, floats[:, 0], scalar)
    rng = np.where((flag >= 2)[:, None], floats, np.float32(np.nan))
    ids = words[:, 4].astype(np.uint64) | (words[:, 5].astype(np.uint64) << np.uint64(32))
    image_bytes = payload - _IR.size - 4 * flag
    image_bytes[payload < _IR.size] = -1
    return RecordHeaders(offsets.copy(), flag, label, rng, ids, image_bytes)


def _set_row(heads: RecordHeaders, i: int, payload: bytes, *, where: str) -> None:
    header, image = unpack_payload(payload, where=where)
    labels = np.atleast_1d(np.asarray(header.label, dtype=np.float32))
    heads.flag[i] = header.flag
    heads.label[i] = labels[0]
    heads.range[i] = labels[:2] if header.flag >= 2 else np.nan
    heads.id[i] = header.id
    heads.image_bytes[i] = len(image)


def _gaps(off: np.ndarray, ends: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges ``[lo, hi)`` of the file outside the records ``[off, ends)`` (sorted)."""
    lo = np.concatenate(([0], ends))
    hi = np.concatenate((off, [size]))
    keep = lo < hi
    return lo[keep], hi[keep]


def _read_index(idx_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(keys, offsets, line numbers)``; line numbers are ``None`` when line ``i + 1`` holds
    entry ``i`` (no blank lines)."""
    # Fast path: one vectorised parse of the whole file (MS1MV3's 5.2M lines in ~0.2 s). Any
    # irregularity falls through to the line-by-line parser, which names the bad line.
    text = Path(idx_path).read_text(encoding="ascii", errors="replace")
    try:
        flat = np.fromstring(text, dtype=np.int64, sep=" ")
    except ValueError:
        flat = None
    # Each line is "key<TAB>offset": as many tabs and lines as pairs of numbers.
    pairs = flat.size // 2 if flat is not None else -1
    if (
        flat is not None
        and flat.size % 2 == 0
        and pairs == text.count("\t")
        and (pairs == 0 or text.rstrip().count("\n") + 1 == pairs)
    ):
        key_arr, off_arr = flat[0::2].copy(), flat[1::2].copy()
        if not off_arr.size or off_arr.min() >= 0:
            return key_arr, off_arr, None
    return _read_index_lines(idx_path)


def _read_index_lines(idx_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys: list[int] = []
    offsets: list[int] = []
    lines: list[int] = []
    with open(idx_path, encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split("\t")
            try:
                if len(fields) != 2:
                    raise ValueError
                key, offset = int(fields[0]), int(fields[1])
            except ValueError:
                raise RecordIOError(
                    f"{idx_path} line {line_no}: expected 'key<TAB>offset', got {line[:80]!r}"
                ) from None
            if offset < 0:
                raise RecordIOError(f"{idx_path} line {line_no}, key {key}: negative offset")
            keys.append(key)
            offsets.append(offset)
            lines.append(line_no)
    return (
        np.asarray(keys, dtype=np.int64),
        np.asarray(offsets, dtype=np.int64),
        np.asarray(lines, dtype=np.int64),
    )
