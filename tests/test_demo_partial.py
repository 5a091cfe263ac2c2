"""The demo's partial-face sets (demo_mask, demo_crop), the per-condition sidecars and the
training occlusion choice (demo format 4)."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from _jobs import TINY_DEMO

import otface.demo.generate as demo
import otface.demo.pairs as pairs
import otface.demo.photos as photos
from otface.data.recordio import IndexedRecordReader, unpack_payload

# The tiny demo with 4 training images and 4 IJB images per identity.
SMALL = {**TINY_DEMO, "images_per_identity": 4, "ijb_images_per_identity": 4}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return demo.generate_demo(tmp_path_factory.mktemp("partial") / "d", seed=5, **SMALL)


def test_the_new_sets_change_no_earlier_file(small, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "write_mask_set", lambda *a, **k: None)
    monkeypatch.setattr(demo, "write_crop_set", lambda *a, **k: None)
    without = _files(demo.generate_demo(tmp_path / "without", seed=5, **SMALL))
    full = _files(small)
    new = {"demo_mask.bin", "demo_crop.bin", "demo_crop.conditions.txt"}
    assert new <= set(full) and not new & set(without)
    for name, data in without.items():
        if name != "README.txt":  # it describes the new sets too
            assert full[name] == data, name


def test_the_occluded_ijb_target_changes_no_earlier_file(small, tmp_path, monkeypatch):
    import otface.demo.ijb as ijb_writer

    monkeypatch.setattr(ijb_writer, "_write_occluded_target", lambda *a, **k: None)
    without = _files(demo.generate_demo(tmp_path / "without", seed=5, **SMALL))
    full = _files(small)
    new = {name for name in full if "demo_occluded" in name or "/occ_" in name}
    assert new and not new & set(without) and set(full) - new == set(without)
    for name, data in without.items():
        if name != "README.txt":  # it describes the new target too
            assert full[name] == data, name


def test_same_seed_same_bytes_other_seed_other_faces(small, tmp_path):
    again = demo.generate_demo(tmp_path / "again", seed=5, **SMALL)
    other = demo.generate_demo(tmp_path / "other", seed=6, **SMALL)
    for name in ("demo_mask.bin", "demo_crop.bin", "demo_crop.conditions.txt"):
        assert (again / name).read_bytes() == (small / name).read_bytes()
    assert (other / "demo_mask.bin").read_bytes() != (small / "demo_mask.bin").read_bytes()


def _pairs(path: Path):
    with open(path, "rb") as f:
        bins, issame = pickle.load(f)
    images = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in bins]
    return images, np.asarray(issame)


@pytest.mark.parametrize("name", ["demo_mask", "demo_crop"])
def test_partial_sets_are_lfw_format_reference_against_partial(small, name):
    images, issame = _pairs(small / f"{name}.bin")
    assert len(issame) == 20 and issame.sum() == 10
    assert list(issame[:4]) == [True, False, True, False]  # alternating, as LFW
    assert all(img.shape == (112, 112, 3) for img in images)
    # The references (first of each pair) never repeat as second members: sides do not mix.
    firsts = {img.tobytes() for img in images[0::2]}
    assert not firsts & {img.tobytes() for img in images[1::2]}


def test_sidecars_name_each_pairs_condition(small):
    hard = (small / "demo_hard.conditions.txt").read_text().split()
    assert len(hard) == 20 and set(hard) <= set(pairs.HARD_KINDS)
    crop = (small / "demo_crop.conditions.txt").read_text().split()
    assert len(crop) == 20 and set(crop) <= set(pairs.CROP_REGIONS)
    assert len(set(crop)) >= 3
    assert not (small / "demo_mask.conditions.txt").exists()


def test_masked_side_is_rendered_with_a_mask_and_references_without(tmp_path, monkeypatch):
    seen = []
    real = photos.render_face

    def spy(identity, shot, scene, rng, **kw):
        seen.append(shot.occlusion)
        return real(identity, shot, scene, rng, **kw)

    monkeypatch.setattr(photos, "render_face", spy)
    idns = photos.identities(0, 900, 3)
    pairs.write_mask_set(tmp_path / "m.bin", 0, 900, idns, 4, 12)
    assert seen == ["", "", "mask", "mask"] * 3


@pytest.mark.parametrize("region", sorted(pairs.CROP_REGIONS))
def test_crop_keeps_about_70_percent_of_the_face(region):
    # A ramp image: each pixel knows where it came from.
    ys, xs = np.mgrid[0:112, 0:112]
    image = np.stack([ys * 2, xs * 2, np.zeros_like(ys)], axis=-1).astype(np.uint8)
    out = pairs.crop_partial(image, region, np.array([0.5, 0.5]))
    assert out.shape == image.shape
    rows = out[..., 0].astype(float) / 2
    cols = out[..., 1].astype(float) / 2
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) / 112**2
    assert 0.66 <= area <= 0.74
    top, left = rows.min(), cols.min()
    expect = {"upper": (0, 0), "lower": (33, 0), "left": (0, 0), "right": (0, 33)}
    if region in expect:
        assert (round(top), round(left)) == pytest.approx(expect[region], abs=1)


_RENDER = photos.render_face


def _training_occluders(root: Path, monkeypatch, **kw):
    seen = []
    real = _RENDER

    def spy(identity, shot, scene, rng, **k):
        seen.append(shot.occlusion)
        return real(identity, shot, scene, rng, **k)

    monkeypatch.setattr(photos, "render_face", spy)
    monkeypatch.setattr(demo, "write_lfw_set", lambda *a, **k: None)
    monkeypatch.setattr(demo, "write_hard_set", lambda *a, **k: None)
    monkeypatch.setattr(demo, "write_ijb_set", lambda *a, **k: 0)
    monkeypatch.setattr(demo, "write_mask_set", lambda *a, **k: None)
    monkeypatch.setattr(demo, "write_crop_set", lambda *a, **k: None)
    sizes = {**SMALL, "train_identities": 20, "images_per_identity": 10}
    demo.generate_demo(root, seed=1, **sizes, **kw)
    return seen


def test_training_occlusion_probability(tmp_path, monkeypatch):
    drawn = _training_occluders(tmp_path / "a", monkeypatch)
    none = _training_occluders(tmp_path / "b", monkeypatch, train_occlusion_p=0.0)
    every = _training_occluders(tmp_path / "c", monkeypatch, train_occlusion_p=1.0)
    assert len(drawn) == len(none) == len(every) == 200
    assert 0.1 < np.mean([bool(o) for o in drawn]) < 0.3  # the renderer's ~20%
    assert not any(none)
    assert all(every)
    # Where an image was drawn with an occluder, p = 1 keeps that very occluder.
    assert all(e == d for d, e in zip(drawn, every) if d)


def test_training_occlusion_has_its_own_cache_entry_and_only_train_rec_differs(tmp_path):
    small = {**SMALL, "images_per_identity": 4}
    plain = demo.generate_demo(tmp_path / "plain", seed=2, **small)
    clean = demo.generate_demo(tmp_path / "clean", seed=2, train_occlusion_p=0.0, **small)
    a, b = _files(plain), _files(clean)
    differ = sorted(k for k in a if a[k] != b[k])
    # Some of the 12 training images carry an occluder as drawn (seed 2): they change, and the
    # index with them; nothing else does.
    assert differ == ["train.idx", "train.rec"]
    reader = IndexedRecordReader(clean / "train.rec", clean / "train.idx")
    assert len(unpack_payload(reader.read(1))[1]) > 0  # key 0 is the identity header
    assert demo.demo_folder_name(0) == f"demo_v{demo.FORMAT_VERSION}_seed0"
    assert demo.demo_folder_name(0, 0.0) == f"demo_v{demo.FORMAT_VERSION}_seed0_occl0"
    with pytest.raises(ValueError, match="train_occlusion_p"):
        demo.generate_demo(tmp_path / "bad", train_occlusion_p=1.5, **small)
