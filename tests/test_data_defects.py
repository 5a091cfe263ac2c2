"""Damaged data sets: index defects fail when the data is opened, undecodable images are replaced.

Files are written with :func:`otface.data.rec_writer.write_rec` (header-0 layout: record 0, images
``1..N`` grouped by identity, then one identity record per identity; each header ``id`` is its
key) and then damaged by editing ``train.idx`` / ``train.rec`` directly. Expected offsets, keys
and pixels come from the files' text and from OpenCV, not from the code under test.
"""

from __future__ import annotations

import re
import struct
import warnings

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from otface.data.datasets import (
    ImageFolderDataset,
    RecDataset,
    UndecodableImageError,
)
from otface.data.loader import dataset_info
from otface.data.rec_writer import write_rec
from otface.data.recordio import RecordIOError

MAGIC = 0xCED7230A


def _jpeg(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def _rgb(data: bytes) -> np.ndarray:
    """Independent decode: OpenCV BGR → RGB ``(112, 112, 3)``."""
    return cv2.cvtColor(
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def _rec(tmp_path, counts, *, bad=(), image=_jpeg):
    """Writes identities with ``counts`` images; ``bad`` keys get garbage bytes.

    Returns ``(root, images)`` with ``images[key]`` the bytes stored for image key ``key``
    (keys 1..N, grouped by identity in order), and ``(N, C)``.
    """
    samples, images = [], {}
    for label, n in enumerate(counts):
        for _ in range(n):
            key = len(samples) + 1
            data = b"\xff\xd8 not a jpeg" if key in bad else image(key)
            samples.append((label, data))
            images[key] = data
    root = tmp_path / "rec"
    write_rec(root, samples)
    return root, images


def _idx(root) -> list[tuple[int, int]]:
    return [
        tuple(map(int, line.split("\t")))
        for line in (root / "train.idx").read_text().split("\n")
        if line
    ]


def _write_idx(root, entries) -> None:
    (root / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in entries))


def _set_offset(root, key: int, offset: int) -> None:
    _write_idx(root, [(k, offset if k == key else o) for k, o in _idx(root)])


# --- A/C: index defects fail when the data is opened ------------------------------------------


def test_missing_image_line_fails_at_open(tmp_path):
    root, _ = _rec(tmp_path, [3, 3], image=lambda k: bytes(40 + k))
    entries = _idx(root)
    byte = dict(entries)[3]
    _write_idx(root, [(k, o) for k, o in entries if k != 3])
    want = (
        rf"train\.idx: key 3 has no line, but record 0's header-0 ranges list images 1\.\.6; an "
        rf"unindexed record at byte {byte} of train\.rec carries header id 3: restore the line "
        rf"'3<TAB>{byte}'"
    )
    with pytest.raises(RecordIOError, match=want):
        RecDataset(root)
    with pytest.raises(RecordIOError, match=want):
        dataset_info(root)


def test_missing_record0_line_fails_at_open(tmp_path):
    """Today's code treats the file as im2rec-style: identity records become images."""
    root, _ = _rec(tmp_path, [2, 3, 1], image=lambda k: bytes(40 + k))
    entries = _idx(root)
    assert entries[0] == (0, 0)
    _write_idx(root, entries[1:])
    want = (
        r"train\.idx: key 0 has no line, but .*train\.rec holds an unindexed header-0 record at "
        r"byte 0 \(images 1\.\.6, identity records 7\.\.9\).*restore the line '0<TAB>0'"
    )
    with pytest.raises(RecordIOError, match=want):
        dataset_info(root)
    with pytest.raises(RecordIOError, match=want):
        RecDataset(root)


def test_missing_last_identity_line_fails_at_open(tmp_path):
    """Today's code drops the header-0 layout (its last identity record is not indexed)."""
    root, _ = _rec(tmp_path, [2, 3, 1], image=lambda k: bytes(40 + k))
    entries = _idx(root)
    last_key, last_byte = entries[-1]
    assert last_key == 9
    _write_idx(root, entries[:-1])
    want = (
        r"train\.idx: key 9 has no line, but record 0's header-0 ranges list identity records "
        rf"7\.\.9 \(this is identity 2\); an unindexed record at byte {last_byte} "
    )
    with pytest.raises(RecordIOError, match=want):
        dataset_info(root)
    with pytest.raises(RecordIOError, match=want):
        RecDataset(root)


@pytest.mark.parametrize(
    "where, shift, expect",
    [
        ("own", 2, r"is not a multiple of 4, so it starts no record"),
        (
            "own",
            16,
            r"does not start a record \(no RecordIO magic there: 0x[0-9a-f]{8}\); no other",
        ),
        ("next", 12, r"does not start a record .*; it points inside record key 5 \(line 6, "),
        # Four bytes before the next record: today's reader says "record header cut at byte 0".
        ("next", -4, r"does not start a record .*; no other line's record covers that byte"),
    ],
)
def test_wrong_offset_fails_at_open(tmp_path, where, shift, expect):
    root, _ = _rec(tmp_path, [3, 3], image=lambda k: bytes(100 + 4 * k))
    offsets = dict(_idx(root))
    bad = (offsets[4] if where == "own" else offsets[5]) + shift
    _set_offset(root, 4, bad)
    with pytest.raises(RecordIOError, match=rf"train\.idx line 5, key 4: offset {bad} {expect}"):
        RecDataset(root)
    if where == "next" and shift > 0:
        with pytest.raises(RecordIOError, match=rf"bytes {offsets[5]}\.\.{offsets[6]}\)$"):
            RecDataset(root)


def test_shared_offset_blames_the_line_whose_key_differs(tmp_path):
    root, _ = _rec(tmp_path, [3, 3], image=lambda k: bytes(40 + k))
    offsets = dict(_idx(root))
    _set_offset(root, 5, offsets[4])  # line 6 (key 5) now points at record 4
    with pytest.raises(
        RecordIOError,
        match=rf"train\.idx line 6, key 5: offset {offsets[4]} is also the offset of key 4 "
        r"\(line 5\), whose header id the record there carries",
    ):
        RecDataset(root)
    _set_offset(root, 5, offsets[5])
    _set_offset(root, 4, offsets[5])  # the earlier line is the wrong one
    with pytest.raises(RecordIOError, match=r"train\.idx line 5, key 4: offset \d+ is also the "):
        RecDataset(root)


def test_truncated_rec_fails_at_open(tmp_path):
    root, _ = _rec(tmp_path, [3, 3], image=lambda k: bytes(40 + k))
    rec = root / "train.rec"
    blob = rec.read_bytes()
    last_key, last = _idx(root)[-1]
    rec.write_bytes(blob[: last + 20])  # inside the last record
    with pytest.raises(
        RecordIOError,
        match=rf"train\.idx line {last_key + 1}, key {last_key}: the record at byte {last} needs "
        rf"bytes up to {len(blob)} but .*train\.rec has {last + 20} bytes: the \.rec is truncated",
    ):
        RecDataset(root)
    offsets = dict(_idx(root))
    rec.write_bytes(blob[: offsets[6]])  # records 6, 7 and 8 start at or past the end
    with pytest.raises(
        RecordIOError,
        match=rf"train\.idx line 7, key 6: offset {offsets[6]} is past the end of .*train\.rec "
        rf"\({offsets[6]} bytes\): the \.rec is truncated or the line is wrong \(2 more lines",
    ):
        dataset_info(root)
    rec.write_bytes(blob[: offsets[6] + 4])
    with pytest.raises(RecordIOError, match=r"line 7, key 6: offset \d+ leaves no room for a "):
        dataset_info(root)


def test_swapped_offsets_caught_by_header_ids(tmp_path):
    """Two images of one identity swapped: labels agree, only the header ids tell; files whose
    writer stores no keys in ``id`` are not checked."""
    root, _ = _rec(tmp_path, [120, 120], image=lambda k: struct.pack("<I", k))
    entries = _idx(root)
    offsets = dict(entries)
    swapped = {10: offsets[11], 11: offsets[10]}
    _write_idx(root, [(k, swapped.get(k, o)) for k, o in entries])
    with pytest.raises(
        RecordIOError,
        match=rf"train\.idx line 11, key 10: the record at byte {offsets[11]} carries header id "
        r"11, not its key \(241 of 243 records carry their own key there.*\(1 more record too\)",
    ):
        RecDataset(root)
    # A file whose header ids are all 0 (not keys), lines swapped: ids are not compared.
    plain = tmp_path / "plain"
    plain.mkdir()
    blob, offsets = b"", []
    for key in range(4):
        payload = struct.pack("<IfQQ", 0, float(key % 2), 0, 0) + bytes(8 + key)
        offsets.append(len(blob))
        blob += struct.pack("<II", MAGIC, len(payload)) + payload + b"\0" * (-len(payload) % 4)
    (plain / "train.rec").write_bytes(blob)
    _write_idx(plain, [(0, offsets[0]), (1, offsets[2]), (2, offsets[1]), (3, offsets[3])])
    assert RecDataset(plain).labels.tolist() == [0, 0, 1, 1]


def test_unindexed_records_warn_in_im2rec_layout(tmp_path):
    """Without header-0 ranges an index may list a subset of records: a warning, not an error."""
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    blob, offsets = b"", []
    for key in range(5):
        payload = struct.pack("<IfQQ", 0, float(key), key, 0) + _jpeg(key)
        offsets.append(len(blob))
        blob += struct.pack("<II", MAGIC, len(payload)) + payload + b"\0" * (-len(payload) % 4)
    rec.write_bytes(blob)
    idx.write_text("".join(f"{k}\t{offsets[k]}\n" for k in (0, 1, 3, 4)))
    with pytest.warns(
        UserWarning,
        match=rf"1 byte range\(s\) holding {offsets[3] - offsets[2]} bytes \(the first at byte "
        rf"{offsets[2]}, a record with header id 2\) are listed by no line of .*train\.idx",
    ):
        ds = RecDataset(tmp_path)
    assert ds.keys.tolist() == [0, 1, 3, 4] and ds.labels.tolist() == [0, 1, 3, 4]


def test_label_disagreeing_with_identity_fails_at_open(tmp_path):
    root, _ = _rec(tmp_path, [2, 2], image=lambda k: bytes(40 + k))
    rec = root / "train.rec"
    blob = bytearray(rec.read_bytes())
    off = dict(_idx(root))[3]
    struct.pack_into("<f", blob, off + 12, 7.0)  # key 3's scalar label (identity 1)
    rec.write_bytes(bytes(blob))
    with pytest.raises(
        RecordIOError,
        match=r"train\.rec, record key 3: header label 7 disagrees with identity 1 of the "
        r"header-0 ranges \(1 of 4 images disagree\)",
    ):
        RecDataset(root)


# --- B: undecodable images are replaced by an image of the same identity ----------------------


def test_rec_garbage_image_replaced_by_next_of_identity(tmp_path):
    root, images = _rec(tmp_path, [3, 2], bad={2})
    ds = RecDataset(root, flip=False, normalize=False, report_bad=True)
    with pytest.warns(UserWarning, match=r"train\.rec, record key 2: image bytes .* could not be "):
        image, label, n_bad = ds[1]
    assert torch.equal(image, _chw(_rgb(images[3])))
    assert label.item() == 0 and n_bad.dtype == torch.int64 and n_bad.item() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per bad image and process
        image2, _, n_bad2 = ds[1]
    assert torch.equal(image2, image) and n_bad2.item() == 1
    good_image, _, good_n = ds[0]
    assert torch.equal(good_image, _chw(_rgb(images[1]))) and good_n.item() == 0
    plain = RecDataset(root, flip=False, normalize=False)
    with pytest.warns(UserWarning):
        item = plain[1]
    assert len(item) == 2 and torch.equal(item[0], image)


def test_rec_replacement_cycles_and_skips_bad_images(tmp_path):
    root, images = _rec(tmp_path, [4, 2], bad={3, 4})
    ds = RecDataset(root, flip=False, normalize=False, report_bad=True)
    with pytest.warns(UserWarning) as record:
        image, label, n_bad = ds[2]  # key 3 bad, key 4 bad, cycle to key 1
    assert torch.equal(image, _chw(_rgb(images[1]))) and label.item() == 0 and n_bad.item() == 2
    assert sorted(re.search(r"record key (\d+)", str(w.message))[1] for w in record) == ["3", "4"]
    image, _, n_bad = ds[3]  # key 4: known bad (not decoded or warned again), cycle to key 1
    assert torch.equal(image, _chw(_rgb(images[1]))) and n_bad.item() == 1


def test_image_folder_zero_byte_jpg_replaced(tmp_path):
    root = tmp_path / "faces"
    stored = {}
    for c, n in enumerate([3, 2]):
        (root / f"id{c}").mkdir(parents=True)
        for j in range(n):
            path = root / f"id{c}" / f"{j}.jpg"
            path.write_bytes(_jpeg(10 * c + j))
            stored[path.name, c] = path.read_bytes()
    (root / "id0" / "1.jpg").write_bytes(b"")
    ds = ImageFolderDataset(root, flip=False, normalize=False, report_bad=True)
    with pytest.warns(UserWarning, match=r"id0/1\.jpg: image bytes \(0 bytes\) could not be"):
        image, label, n_bad = ds[1]
    assert torch.equal(image, _chw(_rgb(stored["2.jpg", 0]))) and label.item() == 0
    assert n_bad.item() == 1
    (root / "id1" / "0.jpg").unlink()  # unreadable (vanished) file: replaced too
    with pytest.warns(UserWarning, match=r"id1/0\.jpg: cannot read image"):
        image, label, n_bad = ds[3]
    assert torch.equal(image, _chw(_rgb(stored["1.jpg", 1]))) and n_bad.item() == 1


def test_all_images_of_an_identity_bad_raises(tmp_path):
    root, _ = _rec(tmp_path, [2, 2], bad={3, 4})
    ds = RecDataset(root, flip=False)
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            RecordIOError,
            match=r"train\.rec: all 2 images of identity 1 are undecodable \(record keys 3, 4\)$",
        ),
    ):
        ds[3]
    faces = tmp_path / "faces"
    for c in range(2):
        (faces / f"id{c}").mkdir(parents=True)
        for j in range(2):
            (faces / f"id{c}" / f"{j}.jpg").write_bytes(_jpeg(j) if c == 0 else b"")
    folder = ImageFolderDataset(faces, flip=False)
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            RecordIOError,
            match=r"faces/id1: all 2 images of identity 1 are unreadable or undecodable",
        ),
    ):
        folder[2]


def test_item_with_caller_flip(tmp_path):
    root, images = _rec(tmp_path, [2, 2])
    ds = RecDataset(root, flip=True, normalize=False)
    want = _chw(_rgb(images[2]))
    state = torch.get_rng_state()
    assert torch.equal(ds[(1, False)][0], want)
    assert torch.equal(ds[(1, True)][0], want.flip(-1))
    assert torch.equal(ds[(np.int64(1), np.True_)][0], want.flip(-1))
    assert torch.equal(torch.get_rng_state(), state)  # no random draw when the caller decides
    assert torch.equal(RecDataset(root, flip=False, normalize=False)[1][0], want)
    for item in ((1,), (1, 1), "1", 1.0):
        with pytest.raises(TypeError, match="an index or an \\(index, flip: bool\\) pair"):
            ds[item]
    with pytest.raises(IndexError, match="index 4 is out of range for a dataset of 4 images"):
        ds[4]


def test_report_bad_collates_through_dataloader(tmp_path):
    root, _ = _rec(tmp_path, [3, 3], bad={2, 5})
    ds = RecDataset(root, flip=False, report_bad=True)
    with pytest.warns(UserWarning):
        batches = list(DataLoader(ds, batch_size=3, shuffle=False))
    assert [b[2].tolist() for b in batches] == [[0, 1, 0], [0, 1, 0]]
    assert all(
        b[2].dtype == torch.int64 and b[1].tolist() == [i] * 3 for i, b in enumerate(batches)
    )


def test_decode_error_is_a_record_io_error():
    from otface.data.datasets import decode_image

    with pytest.raises(UndecodableImageError, match=r"x\.jpg: image bytes \(3 bytes\)"):
        decode_image(b"abc", where="x.jpg")
    assert issubclass(UndecodableImageError, RecordIOError)
