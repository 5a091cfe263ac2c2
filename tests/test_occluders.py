"""Occlusion augmentation: each occluder covers the facial points it is meant to (the ArcFace
template's, a published fact) and leaves the others; probability, determinism under torch's
seed, the config keys, and the training dataset built with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from easydict import EasyDict as edict
from PIL import Image

from otface.config import ConfigError, load_config
from otface.data.loader import build_dataset
from otface.data.occluders import OCCLUDERS, OcclusionAugment, draw_occluder

# ArcFace's 112×112 five-point template: left eye, right eye, nose tip, mouth corners.
EYES = [(38.2946, 51.6963), (73.5318, 51.5014)]
NOSE = [(56.0252, 71.7366)]
MOUTH = [(41.5493, 92.3655), (70.7299, 92.2041)]


def _covered(before, after, points, scale=1.0):
    return [bool((before[round(y * scale), round(x * scale)] != after[round(y * scale),
            round(x * scale)]).any()) for x, y in points]  # fmt: skip


@pytest.mark.parametrize(
    "kind, covered, free",
    [("mask", NOSE + MOUTH, EYES), ("bar", EYES, NOSE + MOUTH)],
)
@pytest.mark.parametrize("size", [112, 224])
def test_occluder_covers_its_points_and_leaves_the_others(kind, covered, free, size):
    grey = np.full((size, size, 3), 128, np.uint8)
    for seed in range(50):
        out = draw_occluder(grey, kind, np.random.default_rng(seed))
        if kind == "mask" and (out[size // 2, size // 2] == 128).all():  # grey-coloured mask
            continue
        assert all(_covered(grey, out, covered, size / 112)), (kind, seed)
        assert not any(_covered(grey, out, free, size / 112)), (kind, seed)
        assert (grey == 128).all()  # the input is not drawn on


@pytest.mark.parametrize("kind", ["patch", "hand"])
def test_patch_and_hand_cover_part_of_the_face_only(kind):
    grey = np.full((112, 112, 3), 128, np.uint8)
    for seed in range(50):
        changed = (draw_occluder(grey, kind, np.random.default_rng(seed)) != 128).any(-1)
        assert 0.02 < changed.mean() < 0.35, (kind, seed, changed.mean())
    with pytest.raises(ValueError, match="unknown occluder 'scarf'"):
        draw_occluder(grey, "scarf", np.random.default_rng(0))


def test_probability_and_determinism_under_torch_seed():
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 112, 112), np.uint8))
    assert OcclusionAugment(0.0)(image) is image
    torch.manual_seed(1)
    always = [OcclusionAugment(1.0)(image) for _ in range(40)]
    assert all(not torch.equal(a, image) and a.dtype == torch.uint8 for a in always)
    torch.manual_seed(1)
    again = [OcclusionAugment(1.0)(image) for _ in range(40)]
    assert all(torch.equal(a, b) for a, b in zip(always, again))
    torch.manual_seed(2)
    hits = sum(not torch.equal(OcclusionAugment(0.25)(image), image) for _ in range(400))
    assert 60 <= hits <= 140  # Binomial(400, 0.25): mean 100, sd 8.7
    only_bars = OcclusionAugment(1.0, ["bar"])(image)
    changed = (only_bars != image).any(0)
    assert changed[40:62].any() and not changed[80:].any()
    with pytest.raises(ValueError, match="augment.occluders"):
        OcclusionAugment(0.5, ["mask", "scarf"])


def test_config_keys_are_validated(tmp_path):
    from _jobs import write_job

    cfg = load_config(write_job(tmp_path, "ok", {"augment": {"occlusion_p": 0.3}}))
    assert cfg.augment.occlusion_p == 0.3 and list(cfg.augment.occluders) == list(OCCLUDERS)
    for body, key in [
        ({"augment": {"occlusion_p": 1.5}}, "augment.occlusion_p"),
        ({"augment": {"occluders": ["scarf"]}}, "augment.occluders"),
        ({"augment": {"occlusion": 0.3}}, "augment.occlusion"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(write_job(tmp_path, "bad", body))


def test_training_dataset_draws_occluders_when_asked(tmp_path):
    for c in range(2):
        (tmp_path / "faces" / f"id{c}").mkdir(parents=True)
        for j in range(4):
            img = np.full((112, 112, 3), 60 + 40 * c + 10 * j, np.uint8)
            Image.fromarray(img).save(tmp_path / "faces" / f"id{c}" / f"{j}.png")
    base = edict(rec=str(tmp_path / "faces"), num_classes=2, num_image=8, seed=0)
    plain = build_dataset(base, flip=False)
    torch.manual_seed(0)
    occluded = build_dataset(edict(base, augment={"occlusion_p": 1.0, "occluders": ["mask"]}),
                             flip=False)  # fmt: skip
    for i in range(len(plain)):
        a, b = plain[i][0], occluded[i][0]
        assert a.shape == b.shape and not torch.equal(a, b)
        assert torch.equal(a[:, :40], b[:, :40])  # the mask stays below the eyes
    off = build_dataset(edict(base, augment={"occlusion_p": 0.0}), flip=False)
    assert all(torch.equal(off[i][0], plain[i][0]) for i in range(len(plain)))
