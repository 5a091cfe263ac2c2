"""The identity labels of an InsightFace ``.rec`` folder, read from its record headers.

:func:`read_rec_labels` reads every record's header once (no image is decoded) and checks the
index against them: header-0 identity ranges (MS1M, Glint360K, WebFace) or per-record labels
(``im2rec``), with one error naming the file and the key for anything inconsistent.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from otface.data.recordio import (
    IndexedRecordReader,
    RecordHeaders,
    RecordIOError,
    RecordScan,
)

__all__ = ["RecLabels", "read_rec_labels"]


class RecLabels(NamedTuple):
    """Image records of a ``.rec`` file: their keys and labels (int64, same length), and the
    number of identities record 0's header-0 ranges list (``end - first``; identities without
    images count), 0 for a file without header 0."""

    keys: np.ndarray
    labels: np.ndarray
    header0: int


def read_rec_labels(reader: IndexedRecordReader) -> RecLabels:
    """Checks a ``.rec`` file against its index and finds the image records and their labels.

    One pass over every record's header (:meth:`IndexedRecordReader.scan`), no image decoded.
    With header-0 identity ranges (record 0 holds ``(first, end)`` and no image), every key in
    ``[1, end)`` must have an index line, identity records must hold ``(start, end)`` ranges
    covering the images, and each image's header label must equal its identity. Without them
    (im2rec layout), each record's label is its scalar label or first float label. Byte ranges
    of the ``.rec`` listed by no index line are reported by one warning.

    Raises:
        RecordIOError: the first defect: a bad index line (names the line, the key and what is
            wrong), a key missing from the index, inconsistent identity ranges, a label that
            disagrees with its identity or a negative label (names the file and the key).
    """
    if len(reader) == 0:
        raise RecordIOError(f"{reader.rec_path}: the index {reader.idx_path} lists no records")
    scan = reader.scan()
    pos0 = int(reader.positions(np.asarray([0]))[0])
    if pos0 >= 0 and _is_header0(scan.records, pos0, reader):
        result = _header0_labels(reader, scan, pos0)
    else:
        if pos0 < 0:
            _check_unindexed_header0(reader, scan)
        result = _record_labels(reader, scan.records)
    gaps = scan.unindexed
    if gaps.offset.size:
        first = f", a record with header id {int(gaps.id[0])}" if gaps.flag[0] >= 0 else ""
        warnings.warn(
            f"{reader.rec_path}: {gaps.offset.size} byte range(s) holding "
            f"{int((scan.unindexed_end - gaps.offset).sum())} bytes (the first at byte "
            f"{int(gaps.offset[0])}{first}) are listed by no line of {reader.idx_path}; their "
            "records are not used",
            stacklevel=2,
        )
    return result


def _is_range(heads: RecordHeaders, i: np.ndarray | int) -> np.ndarray:
    """Rows holding an integral key range ``1 <= start <= end`` and no image (header-0 layout)."""
    a, b = heads.range[i, 0], heads.range[i, 1]
    with np.errstate(invalid="ignore"):
        return (
            (heads.flag[i] >= 2)
            & (heads.image_bytes[i] == 0)
            & (a == np.round(a))
            & (b == np.round(b))
            & (a >= 1)
            & (a <= b)
        )


def _is_header0(heads: RecordHeaders, pos0: int, reader: IndexedRecordReader) -> bool:
    if _is_range(heads, pos0):
        return True
    # A record 0 that also carries image bytes: header-0 if its range ends at indexed keys.
    first, end = heads.range[pos0]
    if heads.flag[pos0] < 2 or not np.isfinite(heads.range[pos0]).all():
        return False
    if first != int(first) or end != int(end) or not 1 <= first <= end:
        return False
    return (first == end or int(end) - 1 in reader) and (first == 1 or int(first) - 1 in reader)


def _check_unindexed_header0(reader: IndexedRecordReader, scan: RecordScan) -> None:
    """Raises if key 0 has no index line while the ``.rec`` holds an unindexed header-0 record.

    A header-0 record ``(first, end)`` is told from an identity record ``(start, end)`` by what
    key ``first`` holds: the first identity record (no image) rather than an image.
    """
    gaps = scan.unindexed
    cand = np.flatnonzero(_is_range(gaps, np.arange(gaps.offset.size)))
    for g in cand.tolist():
        first, end = int(gaps.range[g, 0]), int(gaps.range[g, 1])
        at = int(reader.positions(np.asarray([first]))[0])
        if first < end and at >= 0 and _is_range(scan.records, at):
            raise RecordIOError(
                f"{reader.idx_path}: key 0 has no line, but {reader.rec_path} holds an "
                f"unindexed header-0 record at byte {int(gaps.offset[g])} (images 1..{first - 1},"
                f" identity records {first}..{end - 1}): the index is damaged; restore the line "
                f"'0<TAB>{int(gaps.offset[g])}' or rebuild the index"
            )


def _missing_key_error(
    reader: IndexedRecordReader, scan: RecordScan, missing: np.ndarray, first: int, end: int
) -> RecordIOError:
    key = int(missing[0])
    if key < first:
        what = f"record 0's header-0 ranges list images 1..{first - 1}"
    else:
        what = (
            f"record 0's header-0 ranges list identity records {first}..{end - 1} (this is "
            f"identity {key - first})"
        )
    hint = ""
    gaps = scan.unindexed
    at = np.flatnonzero((gaps.flag >= 0) & (gaps.id == np.uint64(key)))
    if at.size:
        byte = int(gaps.offset[at[0]])
        hint = (
            f"; an unindexed record at byte {byte} of {reader.rec_path.name} carries header id "
            f"{key}: restore the line '{key}<TAB>{byte}' or rebuild the index"
        )
    more = f" ({missing.size - 1} more keys are missing)" if missing.size > 1 else ""
    return RecordIOError(f"{reader.idx_path}: key {key} has no line, but {what}{more}{hint}")


def _header0_labels(reader: IndexedRecordReader, scan: RecordScan, pos0: int) -> RecLabels:
    heads, where = scan.records, str(reader.rec_path)
    first, end = (int(v) for v in heads.range[pos0])
    if end > 2 * len(reader) + 1:
        raise RecordIOError(
            f"{reader.idx_path}: record 0's header-0 ranges list keys 1..{end - 1}, but the index "
            f"has only {len(reader)} lines"
        )
    pos = reader.positions(np.arange(1, end))
    missing = np.flatnonzero(pos < 0) + 1
    if missing.size:
        raise _missing_key_error(reader, scan, missing, first, end)
    identity = pos[first - 1 :]
    no_range = np.flatnonzero(heads.flag[identity] < 2)
    if no_range.size:
        c = int(no_range[0])
        raise RecordIOError(
            f"{where}, record key {first + c}: identity record {c} has no (start, end) range"
        )
    starts, stops = heads.range[identity, 0], heads.range[identity, 1]
    labels = np.full(first - 1, -1, dtype=np.int64)
    for c, (a, b) in enumerate(zip(starts.tolist(), stops.tolist())):
        if not 1 <= a <= b <= first:
            raise RecordIOError(
                f"{where}, record key {first + c}: identity {c} range [{a:g}, {b:g}) is outside "
                f"the image keys [1, {first})"
            )
        labels[int(a) - 1 : int(b) - 1] = c
    unlabelled = np.flatnonzero(labels < 0)
    if unlabelled.size:
        raise RecordIOError(
            f"{where}: image record key {int(unlabelled[0]) + 1} (and {unlabelled.size - 1} "
            "more) is in no identity range of the header-0 layout"
        )
    stored = heads.label[pos[: first - 1]]
    wrong = np.flatnonzero(stored.astype(np.float64) != labels)
    if wrong.size:
        i = int(wrong[0])
        raise RecordIOError(
            f"{where}, record key {i + 1}: header label {stored[i]:g} disagrees with identity "
            f"{int(labels[i])} of the header-0 ranges ({wrong.size} of {labels.size} images "
            "disagree)"
        )
    return RecLabels(np.arange(1, first, dtype=np.int64), labels, end - first)


def _record_labels(reader: IndexedRecordReader, heads: RecordHeaders) -> RecLabels:
    value = heads.label
    bad = np.flatnonzero(~(value >= 0))
    if bad.size:
        i = int(bad[0])
        raise RecordIOError(
            f"{reader.rec_path}, record key {int(reader.keys[i])}: label {value[i]:g} is not a "
            "label >= 0"
        )
    return RecLabels(reader.keys.copy(), value.astype(np.int64), 0)
