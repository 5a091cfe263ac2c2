"""python -m otface.data.pack reports what it packed: identities, images, images per identity,
identities short of sampler.k, and the images it resized to 112x112."""

import cv2
import numpy as np

from otface.data.pack import main as pack_main
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
