"""RecordIO reader/writer against files laid out by hand from the format definition.

Format facts used here (dmlc/mxnet RecordIO, InsightFace layout): each part is
``uint32 0xced7230a``, ``uint32 cflag << 29 | length``, payload, zero padding to 4 bytes; a payload
holding the magic word at a 4-byte aligned position is split there (cflag 1 = first part,
2 = middle, 3 = last) and the magic word is dropped from the stored parts; the payload starts with
``struct "IfQQ"`` (flag, label, id, id2) and ``flag`` float32 labels when ``flag > 0``; the
``.idx`` file has ``key\\toffset`` lines.
"""

from __future__ import annotations

import os
import struct

import cv2
import numpy as np
import pytest

from otface.data.datasets import RecDataset, read_rec_labels
from otface.data.pack import main as pack_main
from otface.data.recordio import (
    IndexedRecordReader,
    RecordIOError,
    encode_record,
    unpack_payload,
)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)


def _part(cflag: int, data: bytes) -> bytes:
    return struct.pack("<II", MAGIC, (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def _header(flag: int, label: float, id_: int = 0, id2: int = 0) -> bytes:
    return struct.pack("<IfQQ", flag, label, id_, id2)


def _jpeg(seed: int, size: int = 112) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def _write(tmp_path, records: list[tuple[int, bytes]]) -> tuple:
    """Writes (key, raw record bytes) in order; returns (rec path, idx path, offsets)."""
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    offsets, blob = {}, b""
    for key, raw in records:
        offsets[key] = len(blob)
        blob += raw
    rec.write_bytes(blob)
    idx.write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))
    return rec, idx, offsets


def _header0_file(tmp_path):
    """3 images: identity 0 = keys 1, 2; identity 1 = key 3 (stored as a two-part record)."""
    jpegs = [_jpeg(i) for i in range(3)]
    recs = [(0, _part(0, _header(2, 0.0) + struct.pack("<2f", 4.0, 6.0)))]
    recs.append((1, _part(0, _header(0, 0.0, 1) + jpegs[0])))
    recs.append((2, _part(0, _header(0, 0.0, 2) + jpegs[1])))
    # Key 3's payload = header + MAGIC + jpeg: the magic word sits at byte 24 (aligned), so the
    # writer must split it into a first part (24 bytes) and a last part (the JPEG).
    recs.append((3, _part(1, _header(0, 1.0, 3)) + _part(3, jpegs[2])))
    recs.append((4, _part(0, _header(2, 0.0, 4) + struct.pack("<2f", 1.0, 3.0))))
    recs.append((5, _part(0, _header(2, 0.0, 5) + struct.pack("<2f", 3.0, 4.0))))
    return _write(tmp_path, recs), jpegs


def test_hand_laid_header0_file(tmp_path):
    (rec, idx, _), jpegs = _header0_file(tmp_path)
    reader = IndexedRecordReader(rec, idx)
    header, image = unpack_payload(reader.read(3))
    assert header.flag == 0 and header.label == 1.0 and header.id == 3
    assert image == MAGIC_BYTES + jpegs[2]
    for key in (1, 2):
        assert unpack_payload(reader.read(key))[1] == jpegs[key - 1]
    h0 = reader.read_header(0)
    assert h0.flag == 2 and list(h0.label) == [4.0, 6.0]
    keys, labels, header0 = read_rec_labels(reader)
    assert header0 and keys.tolist() == [1, 2, 3] and labels.tolist() == [0, 0, 1]
    assert labels.dtype == np.int64


def test_scan_matches_per_record_headers(tmp_path):
    """The one-pass scan gives each record's header as the per-record reader decodes it."""
    (rec, idx, offsets), _ = _header0_file(tmp_path)
    reader = IndexedRecordReader(rec, idx)
    scan = reader.scan()
    assert scan.records.offset.tolist() == [offsets[k] for k in reader.keys.tolist()]
    for i, key in enumerate(reader.keys.tolist()):
        header, image = unpack_payload(reader.read(key))
        labels = np.atleast_1d(header.label)
        assert scan.records.flag[i] == header.flag and scan.records.id[i] == header.id
        assert scan.records.label[i] == labels[0]
        assert scan.records.image_bytes[i] == len(image)
        want_range = labels[:2] if header.flag >= 2 else [np.nan, np.nan]
        np.testing.assert_array_equal(scan.records.range[i], want_range)
    assert scan.unindexed.offset.size == 0 and scan.unindexed_end.size == 0


def test_scan_record_split_inside_its_header(tmp_path):
    """A header whose id holds the magic word at an aligned position: the first part is 8 bytes
    long, so the scan joins the parts to read the header."""
    jpeg = _jpeg(7)
    split = _part(1, _header(0, 2.0, MAGIC)[:8]) + _part(3, _header(0, 2.0, MAGIC)[12:] + jpeg)
    rec, idx, _ = _write(tmp_path, [(0, _part(0, _header(0, 5.0, 0) + jpeg)), (1, split)])
    records = IndexedRecordReader(rec, idx).scan().records
    assert records.flag.tolist() == [0, 0] and records.label.tolist() == [5.0, 2.0]
    assert records.id.tolist() == [0, MAGIC]
    assert records.image_bytes.tolist() == [len(jpeg), len(jpeg)]


def test_scan_without_mmap_reads_the_same_words(tmp_path, monkeypatch):
    """Where a file cannot be memory-mapped, the scan falls back to one read per record."""
    import mmap

    (rec, idx, _), _ = _header0_file(tmp_path)
    mapped = IndexedRecordReader(rec, idx).scan()

    def no_mmap(*args, **kwargs):
        raise OSError("mmap unavailable")

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    unmapped = IndexedRecordReader(rec, idx).scan()
    for a, b in zip(mapped.records, unmapped.records):
        np.testing.assert_array_equal(a, b)


def test_encode_record_matches_hand_layout():
    payload = _header(0, 1.0, 3) + MAGIC_BYTES + b"abcde"
    assert encode_record(payload) == _part(1, _header(0, 1.0, 3)) + _part(3, b"abcde")
    # Unaligned magic bytes are not split; odd lengths get zero padding.
    unaligned = b"x" + MAGIC_BYTES + b"yy"
    assert encode_record(unaligned) == _part(0, unaligned)
    # Two aligned occurrences give first, middle and last parts.
    two = b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES
    assert encode_record(two) == _part(1, b"abcd") + _part(2, b"efgh") + _part(3, b"")


def test_hand_laid_per_record_labels(tmp_path):
    """im2rec style: no header-0 record, each image carries its label (scalar or array)."""
    jpegs = [_jpeg(10 + i) for i in range(3)]
    recs = [
        (0, _part(0, _header(0, 5.0, 0) + jpegs[0])),
        (1, _part(0, _header(1, 0.0, 1) + struct.pack("<f", 2.0) + jpegs[1])),
        (7, _part(0, _header(0, 0.0, 7) + jpegs[2])),
    ]
    rec, idx, _ = _write(tmp_path, recs)
    reader = IndexedRecordReader(rec, idx)
    keys, labels, header0 = read_rec_labels(reader)
    assert not header0 and keys.tolist() == [0, 1, 7] and labels.tolist() == [5, 2, 0]
    header, image = unpack_payload(reader.read(1))
    assert header.flag == 1 and header.label.tolist() == [2.0] and image == jpegs[1]
    ds = RecDataset(tmp_path, flip=False)
    img, label = ds[2]
    assert label.item() == 0 and img.shape == (3, 112, 112)
    want = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpegs[2], np.uint8), 1), cv2.COLOR_BGR2RGB)
    np.testing.assert_allclose(img.permute(1, 2, 0).numpy(), want / 127.5 - 1.0, atol=1e-6)


def test_packer_round_trip(tmp_path):
    root = tmp_path / "faces"
    expected = []  # (label, bytes) in sorted folder / file order
    for label, name in enumerate(["alice", "bob", "carol"]):
        (root / name).mkdir(parents=True)
        for j in range(label + 1):
            data = _jpeg(100 * label + j, size=112)
            if label == 1 and j == 0:
                # A payload with an aligned magic word at byte 24, in a JPEG comment segment
                # (FF FE, length) so that the image still decodes.
                comment = b"x" * 18 + MAGIC_BYTES + b"xx"
                segment = b"\xff\xfe" + struct.pack(">H", 2 + len(comment)) + comment
                data = data[:2] + segment + data[2:]
                assert data[24:28] == MAGIC_BYTES
            (root / name / f"{j:03d}.jpg").write_bytes(data)
            expected.append((label, data))
    out = tmp_path / "packed"
    assert pack_main([str(root), str(out)]) == 0
    reader = IndexedRecordReader(out / "train.rec", out / "train.idx")
    keys, labels, header0 = read_rec_labels(reader)
    assert header0 and keys.tolist() == [1, 2, 3, 4, 5, 6]
    assert labels.tolist() == [lab for lab, _ in expected]
    for key, (lab, data) in zip(keys, expected):
        header, image = unpack_payload(reader.read(int(key)))
        assert image == data and header.label == lab
    h0 = reader.read_header(0)
    assert list(h0.label) == [7.0, 10.0]
    assert [list(reader.read_header(k).label) for k in (7, 8, 9)] == [[1, 2], [2, 4], [4, 7]]
    assert (out / "property").read_text().strip() == "3,112,112"
    assert (out / "classes.txt").read_text().split() == ["alice", "bob", "carol"]
    # The reader's own idx check: lines are "key<TAB>offset" and offsets hit the magic word.
    blob = (out / "train.rec").read_bytes()
    for line in (out / "train.idx").read_text().splitlines():
        key, off = line.split("\t")
        assert blob[int(off) : int(off) + 4] == MAGIC_BYTES


def test_truncated_file(tmp_path):
    (rec, idx, offsets), _ = _header0_file(tmp_path)
    blob = rec.read_bytes()
    rec.write_bytes(blob[: offsets[5] + 20])  # cut inside the last record's payload
    with pytest.raises(RecordIOError, match=r"train\.rec, record key 5: truncated"):
        IndexedRecordReader(rec, idx).read(5)
    # Cut inside the second part of the two-part record 3 (now the last one indexed).
    rec.write_bytes(blob[: offsets[3] + 40])
    idx.write_text("".join(f"{k}\t{offsets[k]}\n" for k in range(4)))
    with pytest.raises(RecordIOError, match=r"train\.rec, record key 3: truncated"):
        IndexedRecordReader(rec, idx).read(3)


def test_bad_magic(tmp_path):
    (rec, idx, offsets), _ = _header0_file(tmp_path)
    blob = bytearray(rec.read_bytes())
    blob[offsets[2]] ^= 0xFF
    rec.write_bytes(bytes(blob))
    with pytest.raises(RecordIOError, match=r"train\.rec, record key 2: bad magic"):
        IndexedRecordReader(rec, idx).read(2)


def test_index_past_end(tmp_path):
    (rec, idx, offsets), _ = _header0_file(tmp_path)
    size = rec.stat().st_size
    idx.write_text(idx.read_text().replace(f"4\t{offsets[4]}", f"4\t{size + 16}"))
    with pytest.raises(
        RecordIOError, match=r"train\.idx line 5, key 4: offset \d+ is past the end"
    ):
        IndexedRecordReader(rec, idx)


def test_missing_index(tmp_path):
    (rec, idx, _), _ = _header0_file(tmp_path)
    idx.unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.idx"):
        IndexedRecordReader(rec, idx)


def test_bad_index_line(tmp_path):
    (rec, idx, _), _ = _header0_file(tmp_path)
    idx.write_text(idx.read_text() + "9 oops\n")
    with pytest.raises(RecordIOError, match=r"train\.idx line 7: expected"):
        IndexedRecordReader(rec, idx)


def test_identity_range_outside_images(tmp_path):
    recs = [
        (0, _part(0, _header(2, 0.0) + struct.pack("<2f", 2.0, 3.0))),
        (1, _part(0, _header(0, 0.0) + _jpeg(0))),
        (2, _part(0, _header(2, 0.0) + struct.pack("<2f", 1.0, 5.0))),
    ]
    rec, idx, _ = _write(tmp_path, recs)
    with pytest.raises(RecordIOError, match=r"record key 2: identity 0 range \[1, 5\)"):
        read_rec_labels(IndexedRecordReader(rec, idx))


def test_index_parse_fast_path_and_bad_lines(tmp_path):
    from otface.data.recordio import RecordIOError, _read_index

    idx = tmp_path / "train.idx"
    idx.write_text("".join(f"{k}\t{k * 37 + 5}\n" for k in range(1000)) + "\n")
    keys, offsets, lines = _read_index(idx)
    assert keys.tolist() == list(range(1000)) and lines is None
    assert offsets.tolist() == [k * 37 + 5 for k in range(1000)]
    for bad, line in (("0\t0\n1 8\n", 2), ("0\t0\n1\tx\n", 2), ("0\t0\t4\n", 1)):
        idx.write_text(bad)
        with pytest.raises(RecordIOError, match=f"train.idx line {line}: expected"):
            _read_index(idx)


def _faces_with_bad_files(root):
    """Three identities of good JPEGs, plus a JPEG header followed by garbage, a JPEG cut to
    200 bytes and an empty file, each in its own identity's folder."""
    good = 0
    for label, name in enumerate(["alice", "bob", "carol"]):
        (root / name).mkdir(parents=True)
        for j in range(2):
            (root / name / f"{j:03d}.jpg").write_bytes(_jpeg(10 * label + j, size=112))
            good += 1
    (root / "alice" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(4000))
    (root / "bob" / "cut.jpg").write_bytes(_jpeg(99, size=112)[:200])
    (root / "dave").mkdir()
    (root / "dave" / "empty.jpg").write_bytes(b"")
    return good


def test_packer_decodes_every_image_and_writes_nothing_when_it_refuses(tmp_path, capsys):
    root = tmp_path / "faces"
    _faces_with_bad_files(root)
    out = tmp_path / "packed"
    assert pack_main([str(root), str(out)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "3 of 9 files" in lines[0] and "--skip-bad" in lines[0]
    named = sorted(line for line in err.splitlines() if line.startswith("bad image: "))
    assert named == [  # every bad file, one line each
        "bad image: alice/garbage.jpg: cannot be decoded (truncated or damaged)",
        "bad image: bob/cut.jpg: cannot be decoded (truncated or damaged)",
        "bad image: dave/empty.jpg: empty file",
    ]
    assert "checked 9/9 images (3 not decodable)" in err  # the progress line
    assert not out.exists()  # not even an empty folder


def test_packer_skip_bad_packs_the_rest_and_lists_what_it_left_out(tmp_path, capsys):
    root = tmp_path / "faces"
    good = _faces_with_bad_files(root)
    out = tmp_path / "packed"
    assert pack_main([str(root), str(out), "--skip-bad", "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "left out 3 files" in captured.out
    named = sorted(line for line in captured.err.splitlines() if line.startswith("left out: "))
    assert [line.split(":")[1].strip() for line in named] == [
        "alice/garbage.jpg",
        "bob/cut.jpg",
        "dave/empty.jpg",
    ]
    reader = IndexedRecordReader(out / "train.rec", out / "train.idx")
    keys, labels, _ = read_rec_labels(reader)
    assert len(keys) == good and sorted(set(labels.tolist())) == [0, 1, 2]
    for key in keys:  # everything packed decodes
        _, image = unpack_payload(reader.read(int(key)))
        assert cv2.imdecode(np.frombuffer(image, np.uint8), 1) is not None
    # dave had only an empty file: dropped, labels follow the remaining folders.
    assert (out / "classes.txt").read_text().split() == ["alice", "bob", "carol"]
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in skipped) == sorted(
        ["alice/garbage.jpg", "bob/cut.jpg", "dave/empty.jpg"]
    )
