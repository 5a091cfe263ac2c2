"""Checking a ``.rec`` file against its ``.idx`` in one pass: :func:`scan_records`, which
:meth:`IndexedRecordReader.scan <otface.data.recordio.IndexedRecordReader.scan>` runs.

The words at the start of every indexed record are read through one read-only memory map and
decoded as arrays of header fields (:class:`RecordHeaders`). See :mod:`otface.data.recordio`
for the file layout.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from otface.data.record_format import (
    _IR,
    _LENGTH_MASK,
    _WORD,
    MAGIC,
    RecordIOError,
    and_more,
    decode_record,
    unpack_payload,
)

if TYPE_CHECKING:
    from otface.data.recordio import IndexedRecordReader

__all__ = ["RecordHeaders", "RecordScan", "scan_records"]

_ID_AGREEMENT = 0.99  # share of records whose header id equals their key for ids to be checked


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


def scan_records(reader: IndexedRecordReader) -> RecordScan:
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
    n, size = len(reader), reader.file_size
    order = np.argsort(reader.offsets, kind="stable")
    off = reader.offsets[order]
    same = np.flatnonzero(off[1:] == off[:-1])
    if same.size:
        raise _shared_offset(reader, order, off, same)
    words = _gather_words(reader.rec_path, off, size)
    cflag = (words[:, 1] >> 29).astype(np.int64)
    payload = (words[:, 1] & _LENGTH_MASK).astype(np.int64)
    starts = (off % 4 == 0) & (words[:, 0] == MAGIC) & (cflag <= 1)
    ends = off + 8 + payload + (-payload % 4)
    for i in np.flatnonzero(starts & (cflag == 1)).tolist():
        ends[i], payload[i] = _walk_parts(reader, int(off[i]), where=reader.where(int(order[i])))
    bad = np.flatnonzero(~starts)
    if bad.size:
        raise _bad_start(reader, order, off, words, bad, ends)
    nxt = np.append(off[1:], size)
    over = np.flatnonzero(ends > nxt)
    if over.size:
        i = int(over[0])
        where = reader.where(int(order[i]))
        if i == n - 1:
            raise RecordIOError(
                f"{where}: the record at byte {int(off[i])} needs bytes up to "
                f"{int(ends[i])} but {reader.rec_path} has {size} bytes: the .rec is truncated"
            )
        j = int(order[i + 1])
        raise RecordIOError(
            f"{where}: the record at byte {int(off[i])} runs to byte {int(ends[i])}, past "
            f"the start of key {int(reader.keys[j])} (line {reader.line_no(j)}) at byte "
            f"{int(off[i + 1])}: one of the two lines is wrong or the record is damaged"
        )
    heads = _header_fields(words, off, payload)
    # A first part too short to hold the header and two labels: join the parts (rare).
    first_part = (words[:, 1] & _LENGTH_MASK).astype(np.int64)
    for i in np.flatnonzero((cflag == 1) & (first_part < _IR.size + 8)).tolist():
        where = reader.where(int(order[i]))
        body = decode_record(reader.pread(int(off[i]), int(ends[i] - off[i])), where=where)
        _set_row(heads, i, body, where=where)
    short = np.flatnonzero(heads.image_bytes < 0)
    if short.size:
        i = int(short[np.argmin(order[short])])
        raise RecordIOError(
            f"{reader.where(int(order[i]))}: the record at byte {int(off[i])} has a payload of "
            f"{int(payload[i])} bytes, too short for the {_IR.size}-byte header and the "
            f"{max(int(heads.flag[i]), 0)} labels it announces{and_more(short.size - 1, 'record')}"
        )
    _check_ids(reader, order, heads)
    records = RecordHeaders(*(_unsort(a, order) for a in heads))
    gap_lo, gap_hi = _gaps(off, ends, size)
    gap_words = _gather_words(reader.rec_path, gap_lo, size)
    room = gap_hi - gap_lo - 8
    gap_len = (gap_words[:, 1] & _LENGTH_MASK).astype(np.int64)
    whole = (gap_words[:, 0] == MAGIC) & (gap_words[:, 1] >> 29 == 0) & (gap_len <= room)
    gap_heads = _header_fields(gap_words, gap_lo, np.where(whole, gap_len, -1))
    gap_heads.flag[~whole | (gap_heads.image_bytes < 0)] = -1
    return RecordScan(records, gap_heads, gap_hi)


def _walk_parts(reader: IndexedRecordReader, offset: int, *, where: str) -> tuple[int, int]:
    """Follows the parts of a split record from ``offset``: ``(end byte, payload bytes)``."""
    pos, total = offset, -4
    while True:
        head = reader.pread(pos, 8)
        if len(head) < 8:
            raise RecordIOError(
                f"{where}: the record at byte {offset} is cut at byte {pos}, the end of "
                f"{reader.rec_path}: the .rec is truncated"
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
        if pos > reader.file_size:
            raise RecordIOError(
                f"{where}: the record at byte {offset} needs bytes up to {pos} but "
                f"{reader.rec_path} has {reader.file_size} bytes: the .rec is truncated"
            )
        if cflag == 3:
            return pos, total


def _bad_start(
    reader: IndexedRecordReader,
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
            f"; it points inside record key {int(reader.keys[k])} (line {reader.line_no(k)}, "
            f"bytes {int(off[good[j]])}..{int(ends[good[j]])})"
        )
    else:
        inside = "; no other line's record covers that byte"
    return RecordIOError(
        f"{reader.where(int(order[i]))}: offset {x} {what}{inside}{and_more(bad.size - 1, 'line')}"
    )


def _shared_offset(
    reader: IndexedRecordReader, order: np.ndarray, off: np.ndarray, same: np.ndarray
) -> RecordIOError:
    """The error for two lines with one offset; the wrong one is the line whose key differs
    from the header id stored there, when one of them matches it."""
    x = int(off[same[0]])
    wrong, right = int(order[same[0] + 1]), int(order[same[0]])
    word = _gather_words(reader.rec_path, off[same[0] : same[0] + 1], reader.file_size)[0]
    stored = int(word[4]) | int(word[5]) << 32 if word[0] == MAGIC else None
    if stored is not None and stored == int(reader.keys[wrong]):
        wrong, right = right, wrong
    whose = ", whose header id the record there carries" if stored == reader.keys[right] else ""
    return RecordIOError(
        f"{reader.where(wrong)}: offset {x} is also the offset of key "
        f"{int(reader.keys[right])} (line {reader.line_no(right)}){whose}; each line must point "
        f"at its own record{and_more(same.size - 1, 'shared offset')}"
    )


def _check_ids(reader: IndexedRecordReader, order: np.ndarray, heads: RecordHeaders) -> None:
    keys = reader.keys[order]
    agree = (keys >= 0) & (heads.id == keys.astype(np.uint64))
    n, n_agree = int(keys.size), int(agree.sum())
    if n_agree == n or n_agree < _ID_AGREEMENT * n:
        return
    wrong = np.flatnonzero(~agree)
    i = int(wrong[np.argmin(order[wrong])])
    raise RecordIOError(
        f"{reader.where(int(order[i]))}: the record at byte {int(heads.offset[i])} carries "
        f"header id {int(heads.id[i])}, not its key ({n_agree} of {n} records carry their "
        "own key there, as im2rec and InsightFace's writers store it): the line points at "
        f"another record{and_more(wrong.size - 1, 'record')}"
    )


# Words read at each record: magic, lrecord, flag, label, id (2 words), two float labels (id2,
# words 6 and 7, is skipped).
_GATHER_STEPS = np.array([0, 1, 2, 3, 4, 5, 8, 9])
_GATHER_WORDS = _GATHER_STEPS.size
_GATHER_CHUNK = 1 << 18  # records per gather: bounds the index array to 16 MiB


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
