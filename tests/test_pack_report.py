"""python -m otface.data.pack reports what it packed: identities, images, images per identity,
identities short of sampler.k, and the images it resized to 112x112."""

import warnings

import cv2
import numpy as np
import pytest

from otface.data import RecDataset
from otface.data import pack as pack_module
from otface.data.pack import main as pack_main
from otface.data.pack import pack_image_folder
from otface.data.rec_labels import read_rec_labels
from otface.data.recordio import IndexedRecordReader, unpack_payload


def _image(seed, width, height):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _folder(root):
    """ann 5, ben 2 (one 250x250 JPEG), cat 3 (one 100x120 PNG), dan 4: 14 images."""
    sizes = {
        "ann": [(112, 112)] * 5,
        "ben": [(112, 112), (250, 250)],
        "cat": [(112, 112), (112, 112), (100, 120)],
        "dan": [(112, 112)] * 4,
    }
    seed = 0
    for name, shapes in sizes.items():
        (root / name).mkdir(parents=True)
        for j, (w, h) in enumerate(shapes):
            ext = ".png" if (w, h) == (100, 120) else ".jpg"
            assert cv2.imwrite(str(root / name / f"{j}{ext}"), _image(seed, w, h))
            seed += 1


def test_report(tmp_path, capsys):
    root = tmp_path / "faces"
    _folder(root)
    out = tmp_path / "packed"
    assert pack_main([str(root), str(out), "--k", "4"]) == 0
    text = capsys.readouterr().out
    assert "wrote 14 images of 4 identities" in text
    assert "images per identity: min 2, median 3.5, max 5" in text
    assert "2 identities have fewer than 4 images (sampler.k = 4)" in text
    assert "(ben, cat)" in text
    assert "2 images were not 112x112 (250x250, 100x120): resized to 112x112" in text
    assert "1 of them not square" in text
    reader = IndexedRecordReader(out / "train.rec", out / "train.idx")
    keys, labels, _ = read_rec_labels(reader)
    assert np.bincount(labels).tolist() == [5, 2, 3, 4]
    stored = {}
    for key in keys:
        _, data = unpack_payload(reader.read(int(key)))
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (112, 112, 3)
        stored[int(key)] = data
    # 112x112 files are stored byte for byte: ann's first image is key 1.
    assert stored[1] == (root / "ann" / "0.jpg").read_bytes()
    # ben's 250x250 JPEG (key 7) was resized, and stays a JPEG.
    assert stored[7][:3] == b"\xff\xd8\xff" and stored[7] != (root / "ben" / "1.jpg").read_bytes()


def test_no_short_identities_no_resizes(tmp_path, capsys):
    root = tmp_path / "faces"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for j in range(2):
            cv2.imwrite(str(root / name / f"{j}.jpg"), _image(j, 112, 112))
    assert pack_main([str(root), str(tmp_path / "out"), "--k", "2"]) == 0
    text = capsys.readouterr().out
    assert "images per identity: min 2, median 2, max 2" in text
    assert "fewer than" not in text and "resized" not in text


_CUT = "bad image: cat/cut.jpg: cannot be decoded (truncated or damaged)"


def _add_truncated_jpeg(root):
    ok, buf = cv2.imencode(".jpg", _image(99, 112, 112))
    assert ok
    (root / "cat" / "cut.jpg").write_bytes(buf.tobytes()[:200])


def test_report_from_the_library(tmp_path, monkeypatch):
    root = tmp_path / "faces"
    _folder(root)
    decoded = []
    real_decode = pack_module._decode
    monkeypatch.setattr(pack_module, "_decode", lambda data: decoded.append(1) or real_decode(data))
    result = pack_image_folder(root, tmp_path / "packed")
    report = result.report
    assert report.per_identity.tolist() == [5, 2, 3, 4]
    assert report.names == ["ann", "ben", "cat", "dan"]
    assert report.short_of(4) == ["ben", "cat"] and report.short_of(3) == ["ben"]
    assert report.short_of(2) == []
    assert report.resized == [
        (root / "ben" / "1.jpg", (250, 250)),
        (root / "cat" / "2.png", (100, 120)),
    ]
    assert result.skipped == [] and result.written.num_image == 14
    # Decoded once each in the check pass; decoded again only to resize the two odd sizes.
    assert len(decoded) == 14 + 2
    # Read back through the training dataset: every image is 112x112, so no resize warning.
    monkeypatch.setattr("otface.data.datasets._warned_resize", False)
    ds = RecDataset(tmp_path / "packed", flip=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(len(ds)):
            img, _ = ds[i]
            assert img.shape == (3, 112, 112)


def test_resize_interpolation(tmp_path):
    """A PNG that is shrunk is area-averaged, one that is enlarged is bilinear (stored as PNG,
    so the stored pixels equal OpenCV's resize exactly)."""
    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    big, small = _image(1, 250, 250), _image(2, 56, 70)
    cv2.imwrite(str(root / "a" / "big.png"), big)
    cv2.imwrite(str(root / "a" / "small.png"), small)
    out = tmp_path / "packed"
    pack_image_folder(root, out)
    reader = IndexedRecordReader(out / "train.rec", out / "train.idx")
    stored = []
    for key in (1, 2):
        data = unpack_payload(reader.read(key))[1]
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        stored.append(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    cases = [(big, cv2.INTER_AREA, cv2.INTER_LINEAR), (small, cv2.INTER_LINEAR, cv2.INTER_AREA)]
    for img, (source, want, other) in zip(stored, cases):
        np.testing.assert_array_equal(img, cv2.resize(source, (112, 112), interpolation=want))
        assert not np.array_equal(img, cv2.resize(source, (112, 112), interpolation=other))


def test_bad_file_refused_one_line_each(tmp_path, capsys):
    root = tmp_path / "faces"
    _folder(root)
    _add_truncated_jpeg(root)
    (root / "dan" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "packed"
    assert pack_main([str(root), str(out)]) == 1
    captured = capsys.readouterr()
    bad = [line for line in captured.err.splitlines() if line.startswith("bad image: ")]
    assert bad == [_CUT, "bad image: dan/empty.jpg: empty file"]
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "2 of 16 files are not decodable images" in errors[0]
    assert captured.err.splitlines()[-1] == errors[0]  # the summary comes last
    assert "images per identity" not in captured.out
    assert not out.exists()


def test_skip_bad_names_each_file_and_reports_the_rest(tmp_path, capsys):
    root = tmp_path / "faces"
    _folder(root)
    _add_truncated_jpeg(root)
    out = tmp_path / "packed"
    assert pack_main([str(root), str(out), "--skip-bad"]) == 0
    captured = capsys.readouterr()
    left = [line for line in captured.err.splitlines() if line.startswith("left out: ")]
    assert left == ["left out: cat/cut.jpg: cannot be decoded (truncated or damaged)"]
    assert "wrote 14 images of 4 identities" in captured.out
    assert "images per identity: min 2, median 3.5, max 5" in captured.out
    assert "2 identities have fewer than 4 images" in captured.out
    assert "left out 1 files" in captured.out
    assert (
        out / "skipped.txt"
    ).read_text() == "cat/cut.jpg\tcannot be decoded (truncated or damaged)\n"


def test_many_short_identities_are_counted_and_a_few_named(tmp_path, capsys):
    root = tmp_path / "faces"
    counts = {"p0": 1, "p1": 3, "p2": 2, "p3": 1, "p4": 6, "p5": 3, "p6": 1, "p7": 2}
    seed = 0
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for j in range(n):
            cv2.imwrite(str(root / name / f"{j}.png"), _image(seed, 112, 112))
            seed += 1
    assert pack_main([str(root), str(tmp_path / "out"), "--k", "3"]) == 0
    text = capsys.readouterr().out
    # counts sorted: 1 1 1 2 2 3 3 6 -> median (2 + 2) / 2 = 2; under 3: p0 p2 p3 p6 p7.
    assert "wrote 19 images of 8 identities" in text
    assert "images per identity: min 1, median 2, max 6" in text
    assert "5 identities have fewer than 3 images (sampler.k = 3)" in text
    assert "(p0, p2, p3, p6, p7)" in text
    assert pack_main([str(root), str(tmp_path / "out2"), "--k", "4"]) == 0
    text = capsys.readouterr().out
    assert "7 identities have fewer than 4 images" in text
    assert "(p0, p1, p2, p3, p5 and 2 more)" in text


def test_k_must_be_positive(tmp_path, capsys):
    root = tmp_path / "faces"
    _folder(root)
    with pytest.raises(SystemExit) as exc:
        pack_main([str(root), str(tmp_path / "out"), "--k", "0"])
    assert exc.value.code == 2 and "--k must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
