"""Datasets and the training DataLoader: image folders, packed .rec, synthetic data."""

from __future__ import annotations

import gc

import cv2
import numpy as np
import pytest
import torch
from easydict import EasyDict as edict
from PIL import Image

from otface.data import (
    DatasetInfo,
    ImageFolderDataset,
    RecDataset,
    RecordIOError,
    SyntheticDataset,
    build_train_loader,
    check_dataset_config,
    dataset_info,
    prepare_rec,
    write_rec,
)
from otface.data.datasets import normalize_images
from otface.data.pack import pack_image_folder


def _make_folder(root, counts, *, ext=".png", seed=0):
    """Writes random 112x112 images; returns {path: RGB uint8 array} decoded by PIL."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for c, n in enumerate(counts):
        d = root / f"id{c:02d}"
        d.mkdir(parents=True)
        for j in range(n):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            path = d / f"{j}{ext}"
            Image.fromarray(img).save(path, quality=95)
            pixels[path] = np.asarray(Image.open(path).convert("RGB"))
    return pixels


def _cfg(rec, **kw):
    cfg = edict(
        rec=str(rec),
        batch_size=8,
        num_classes=6,
        num_image=48,
        seed=1,
        num_workers=0,
        sampler=edict(type="pk", k=4),
    )
    cfg.update(kw)
    return cfg


def test_image_folder_dataset_normalisation(tmp_path):
    pixels = _make_folder(tmp_path / "faces", [2, 3])
    ds = ImageFolderDataset(tmp_path / "faces", flip=False)
    assert len(ds) == 5 and ds.labels.tolist() == [0, 0, 1, 1, 1]
    for i, path in enumerate(sorted(pixels)):
        img, label = ds[i]
        assert img.dtype == torch.float32 and img.shape == (3, 112, 112)
        assert label.dtype == torch.int64 and label.item() == ds.labels[i]
        want = (pixels[path].astype(np.float64) / 255.0 - 0.5) / 0.5
        np.testing.assert_allclose(img.permute(1, 2, 0).numpy(), want, atol=1e-6)
        assert img.min() >= -1.0 and img.max() <= 1.0
    flipped = ImageFolderDataset(tmp_path / "faces", flip=True)
    torch.manual_seed(0)
    outcomes = set()
    for _ in range(20):
        img = flipped[0][0]
        plain = ds[0][0]
        if torch.equal(img, plain):
            outcomes.add("plain")
        elif torch.equal(img, plain.flip(-1)):
            outcomes.add("mirrored")
        else:
            outcomes.add("other")
    assert outcomes == {"plain", "mirrored"}


@pytest.mark.slow
def test_packed_rec_loader_two_workers(tmp_path):
    pixels = _make_folder(tmp_path / "faces", [8] * 6, seed=3)
    pack_image_folder(tmp_path / "faces", tmp_path / "rec")
    assert dataset_info(tmp_path / "rec") == DatasetInfo(num_classes=6, num_image=48)
    cfg = _cfg(tmp_path / "rec", num_workers=2)
    by_label = {}
    for path, arr in pixels.items():
        by_label.setdefault(int(path.parent.name[2:]), []).append(arr)
    for world_size in (1, 2):
        for rank in range(world_size):
            loader = build_train_loader(cfg, rank=rank, world_size=world_size)
            assert len(loader) == 48 // (8 * world_size)
            loader.batch_sampler.set_epoch(1)
            n = 0
            for images, labels in loader:
                n += 1
                assert images.shape == (8, 3, 112, 112) and images.dtype == torch.float32
                assert labels.dtype == torch.int64 and labels.shape == (8,)
                assert sorted(np.bincount(labels.numpy()).tolist())[-2:] == [4, 4]
                # Every image is one of its identity's images (maybe mirrored), in [-1, 1].
                img = ((images[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()
                cands = by_label[int(labels[0])]
                assert any(np.array_equal(img, c) or np.array_equal(img, c[:, ::-1]) for c in cands)
            assert n == len(loader)


def test_loader_uint8_batches_and_normalize_images(tmp_path):
    _make_folder(tmp_path / "faces", [4] * 2, seed=5)
    cfg = _cfg(tmp_path / "faces", num_classes=2, num_image=8, batch_size=8)
    ((images, labels),) = list(build_train_loader(cfg, rank=0, world_size=1, normalize=False))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 112, 112)
    want = (images.double() / 255.0 - 0.5) / 0.5
    torch.testing.assert_close(normalize_images(images).double(), want, atol=1e-6, rtol=0)
    assert normalize_images(images).dtype == torch.float32


@pytest.mark.slow
def test_damaged_rec_fails_at_build_and_worker_errors_name_the_identity(tmp_path):
    _make_folder(tmp_path / "faces", [4] * 2, seed=4)
    pack_image_folder(tmp_path / "faces", tmp_path / "rec")
    rec = tmp_path / "rec" / "train.rec"
    offsets = [
        int(line.split("\t")[1])
        for line in (tmp_path / "rec" / "train.idx").read_text().splitlines()
    ]
    pristine = rec.read_bytes()
    blob = bytearray(pristine)
    blob[offsets[3] : offsets[3] + 4] = b"\0\0\0\0"  # bad magic at record key 3
    rec.write_bytes(bytes(blob))
    cfg = _cfg(tmp_path / "rec", num_workers=2, num_classes=2, num_image=8, batch_size=8)
    with pytest.raises(RecordIOError, match=r"train\.idx line 4, key 3: offset \d+ does not start"):
        build_train_loader(cfg, rank=0, world_size=1)
    # Every image of identity 1 (keys 5..8) undecodable: replacement is impossible, and the
    # error crosses the worker boundary naming the identity and the file.
    blob = bytearray(pristine)
    for key in range(5, 9):
        start = offsets[key] + 8 + 24  # image bytes after the framing words and the header
        blob[start : start + 16] = b"\0" * 16  # no JPEG start marker any more
    rec.write_bytes(bytes(blob))
    loader = build_train_loader(cfg, rank=0, world_size=1)
    with pytest.raises(
        RecordIOError, match=r"train\.rec: all 4 images of identity 1 are undecodable"
    ) as excinfo:
        list(loader)
    # torch keeps the failed worker until its iterator is collected (a 5 s join): do it here.
    del excinfo, loader
    gc.collect()


def test_synthetic_loader_deterministic():
    cfg = _cfg("synthetic", num_image=64, num_classes=8, batch_size=8)
    ds = SyntheticDataset(64, 8, seed=1)
    assert np.bincount(ds.labels).tolist() == [8] * 8
    a, b = ds[5][0], SyntheticDataset(64, 8, seed=1)[5][0]
    assert torch.equal(a, b) and not torch.equal(a, SyntheticDataset(64, 8, seed=2)[5][0])
    for world_size in (1, 2):
        loader = build_train_loader(cfg, rank=world_size - 1, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader) == 64 // (8 * world_size)
        x, y = batches[0]
        assert x.shape == (8, 3, 112, 112) and x.min() >= -1 and x.max() <= 1
        assert y.dtype == torch.int64
    assert dataset_info("synthetic") is None


def test_uniform_sampler_from_config():
    cfg = _cfg("synthetic", num_image=70, num_classes=5, sampler=edict(type="uniform", k=4))
    loader = build_train_loader(cfg, rank=0, world_size=2)
    assert len(loader) == 70 // 16 == len(list(loader))
    cfg.sampler.type = "random"
    with pytest.raises(ValueError, match=r"sampler\.type='random'.*'pk', 'uniform'"):
        build_train_loader(cfg, rank=0, world_size=1)


def test_prepare_rec_and_config_checks(tmp_path):
    assert prepare_rec("synthetic") == "synthetic"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_rec(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty.*neither train.rec/train.idx"):
        prepare_rec(str(tmp_path / "empty"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.rec").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"train\.idx is missing"):
        prepare_rec(str(tmp_path / "half"))
    _make_folder(tmp_path / "faces", [2, 1, 3], ext=".jpg")
    assert prepare_rec(str(tmp_path / "faces")) == str(tmp_path / "faces")
    info = dataset_info(tmp_path / "faces")
    assert info == DatasetInfo(num_classes=3, num_image=6)
    with pytest.raises(ValueError, match=r"config\.num_classes=2 .* labels up to 2"):
        check_dataset_config(_cfg(tmp_path / "faces", num_classes=2, num_image=6), info)
    with pytest.raises(ValueError, match=r"config\.num_image=7 .* has 6 images"):
        check_dataset_config(_cfg(tmp_path / "faces", num_classes=3, num_image=7), info)
    check_dataset_config(_cfg(tmp_path / "faces", num_classes=10, num_image=6), info)


def test_rec_dataset_resizes_other_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr("otface.data.datasets._warned_resize", False)
    img = np.zeros((56, 56, 3), np.uint8)
    img[:, :28] = 255
    # Written as it is (the packer would resize it): a .rec made by other tools may hold any size.
    ok, png = cv2.imencode(".png", img)
    assert ok
    write_rec(tmp_path / "rec", [(0, png.tobytes())])
    with pytest.warns(UserWarning, match="resizing to 112x112"):
        x, y = RecDataset(tmp_path / "rec", flip=False)[0]
    assert x.shape == (3, 112, 112) and y.item() == 0
    assert x[:, :, :50].min() == 1.0 and x[:, :, 62:].max() == -1.0
