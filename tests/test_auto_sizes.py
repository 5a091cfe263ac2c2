"""num_classes = "auto" and num_image = "auto" read the sizes from the data: a .rec's header 0
(identities without images count), its property file, or an image folder; given numbers that
disagree with the data are one error naming both."""

import struct

import cv2
import numpy as np
import pytest
from _jobs import write_job
from test_recordio import _header, _jpeg, _part, _write

from otface.config import ConfigError, load_config
from otface.data.datasets import RecDataset
from otface.data.loader import sizes_from_data
from otface.data.pack import pack_image_folder
from otface.train.data import prepare_data

# Identities and their image counts for the folder tests: 11 images of 4 identities.
COUNTS = {"ann": 4, "ben": 2, "cat": 3, "dan": 2}


def _folder(root):
    rng = np.random.default_rng(0)
    for name, n in COUNTS.items():
        (root / name).mkdir(parents=True)
        for j in range(n):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            assert cv2.imwrite(str(root / name / f"{j}.jpg"), img)
    return root


def _cfg(rec, **keys):
    cfg = load_config("configs/demo_otface")
    cfg.rec = str(rec)
    cfg.batch_size = 8
    cfg.num_classes = "auto"
    cfg.num_image = "auto"
    cfg.update(keys)
    return cfg


def test_packed_rec_and_image_folder(tmp_path):
    images = _folder(tmp_path / "faces")
    written = pack_image_folder(images, tmp_path / "data").written
    assert (written.num_classes, written.num_image) == (4, 11)
    for rec in (tmp_path / "data", images):
        cfg = _cfg(rec)
        dataset = prepare_data(cfg)
        assert (cfg.num_classes, cfg.num_image) == (4, 11)
        assert any(note.startswith("num_classes = 'auto': 4, from ") for note in dataset.size_notes)


def test_image_folder_counts_an_identity_without_images(tmp_path):
    images = _folder(tmp_path / "faces")
    (images / "eve").mkdir()  # sorted after the others: label 4, no images
    cfg = _cfg(images)
    prepare_data(cfg)
    assert (cfg.num_classes, cfg.num_image) == (5, 11)


def _header0_with_empty_last_identity(tmp_path):
    """Header 0 lists 3 identities (keys 4..6) over images 1..3; the third has no image:
    identity 0 = keys 1, 2; identity 1 = key 3; identity 2 = [4, 4)."""
    recs = [(0, _part(0, _header(2, 0.0) + struct.pack("<2f", 4.0, 7.0)))]
    for key, label in ((1, 0.0), (2, 0.0), (3, 1.0)):
        recs.append((key, _part(0, _header(0, label, key) + _jpeg(key))))
    for key, (a, b) in zip((4, 5, 6), ((1.0, 3.0), (3.0, 4.0), (4.0, 4.0))):
        recs.append((key, _part(0, _header(2, 0.0, key) + struct.pack("<2f", a, b))))
    _write(tmp_path, recs)
    return tmp_path


def test_header0_without_property(tmp_path):
    root = _header0_with_empty_last_identity(tmp_path)
    assert not (root / "property").exists()
    info, source = sizes_from_data(RecDataset(root))
    assert (info.num_classes, info.num_image) == (3, 3)  # max label + 1 would say 2
    assert source == f"header 0 of {root / 'train.rec'}"


def _im2rec(tmp_path):
    """No header 0: three images with labels 0, 2, 1."""
    recs = [
        (k, _part(0, _header(0, lab, k) + _jpeg(20 + k)))
        for k, lab in ((0, 0.0), (1, 2.0), (2, 1.0))
    ]
    _write(tmp_path, recs)
    return tmp_path


def test_im2rec_with_and_without_property(tmp_path):
    root = _im2rec(tmp_path)
    info, source = sizes_from_data(RecDataset(root))
    assert (info.num_classes, info.num_image) == (3, 3) and "max label + 1" in source
    (root / "property").write_text("10,112,112\n")
    info, source = sizes_from_data(RecDataset(root))
    assert (info.num_classes, info.num_image) == (10, 3) and source == str(root / "property")
    (root / "property").write_text("2,112,112\n")
    with pytest.raises(ValueError, match=r"says 2 classes, but .* labels up to 2 \(3 classes\)"):
        sizes_from_data(RecDataset(root))


def test_given_sizes_that_disagree_name_both(tmp_path):
    images = _folder(tmp_path / "faces")
    with pytest.raises(ConfigError, match=r"num_classes=3 .* labels up to 3 .*num_classes >= 4"):
        prepare_data(_cfg(images, num_classes=3, num_image=8))
    with pytest.raises(ConfigError, match=r"num_image=12 .* has 11 images"):
        prepare_data(_cfg(images, num_classes=4, num_image=12))


def test_auto_with_synthetic_data_is_refused(tmp_path):
    job = write_job(tmp_path, "job", {"rec": "synthetic", "num_classes": "auto"})
    with pytest.raises(ConfigError, match="'num_classes' = 'auto' reads the size from the data"):
        load_config(job)
