"""Synthetic data (``rec = "synthetic"``): deterministic from (seed, index), hard triplets in a
P×K batch (pixel space and an untrained network), and identities that can still be told apart.

Hard triplets and learnability are checked with plain numpy on the pixels, independently of the
generator's own templates and of the project's miner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from otface.backbones import get_model
from otface.data.sampler import PKBatchSampler
from otface.data.synthetic import SyntheticDataset
from otface.mining import mine_hard_triplets


def _pk_batch(ds: SyntheticDataset, *, batch_size: int, k: int, seed: int = 0):
    idx = next(iter(PKBatchSampler(ds.labels, batch_size=batch_size, k=k, seed=seed)))
    x = torch.stack([ds[i][0] for i in idx])
    return x, torch.as_tensor(ds.labels[idx])


def _pixel_hard_anchors(x: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per anchor (a plain loop): is its least similar positive less similar (pixel cosine) than
    its most similar negative?"""
    flat = x.double().flatten(1).numpy()
    flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    y = labels.numpy()
    hard = np.zeros(len(y), dtype=bool)
    for i in range(len(y)):
        pos = [flat[i] @ flat[j] for j in range(len(y)) if j != i and y[j] == y[i]]
        neg = [flat[i] @ flat[j] for j in range(len(y)) if y[j] != y[i]]
        hard[i] = max(neg) > min(pos)
    return hard


def test_items_are_deterministic_from_seed_and_index():
    ds = SyntheticDataset(256, 32, seed=7)
    later = [ds[i][0] for i in (9, 3, 200)]  # order and other items do not matter
    fresh = SyntheticDataset(256, 32, seed=7)
    for i, img in zip((9, 3, 200), later):
        assert torch.equal(fresh[i][0], img)
    assert not torch.equal(SyntheticDataset(256, 32, seed=8)[9][0], later[0])
    img, label = ds[9]
    assert img.shape == (3, 112, 112) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1 and img.std() > 0.1
    assert label.dtype == torch.int64 and int(label) == ds.labels[9]
    with pytest.raises(IndexError, match="256"):
        ds[256]


def test_images_of_one_identity_differ():
    ds = SyntheticDataset(256, 32, seed=0)
    same = np.flatnonzero(ds.labels == ds.labels[0])[:2]
    a, b = (ds[int(i)][0] for i in same)
    assert (a - b).abs().mean() > 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pk_batch_has_hard_triplets_in_pixel_space(seed):
    # Before this generator, every image was its identity's pattern plus weak noise: positives
    # had cosine ~0.9, negatives ~0, and no anchor was ever hard.
    ds = SyntheticDataset(2048, 256, seed=seed)
    x, labels = _pk_batch(ds, batch_size=64, k=4, seed=seed)
    hard = _pixel_hard_anchors(x, labels)
    assert 0.1 < hard.mean() < 0.9  # hard triplets, yet not every anchor


def test_untrained_r18_lite_and_the_miner_find_hard_triplets():
    ds = SyntheticDataset(1024, 128, seed=2048)
    x, labels = _pk_batch(ds, batch_size=32, k=4)
    torch.manual_seed(0)
    net = get_model("r18_lite")
    with torch.no_grad():
        embeddings = net(x)
    assert mine_hard_triplets(embeddings, labels).anchor.numel() > 0


def test_identities_are_learnable():
    # Leave-one-out nearest class mean in pixel space: the identity signal survives the lighting,
    # pose, contrast and noise of each image.
    k, n_id = 6, 32
    ds = SyntheticDataset(k * n_id, n_id, seed=3)
    flat = np.stack([ds[i][0].double().flatten().numpy() for i in range(len(ds))])
    y = ds.labels
    sums = np.stack([flat[y == c].sum(0) for c in range(n_id)])
    correct = 0
    for i in range(len(y)):
        means = sums.copy()
        means[y[i]] -= flat[i]
        means /= np.bincount(y, minlength=n_id)[:, None] - (np.arange(n_id) == y[i])[:, None]
        correct += int(np.argmin(((means - flat[i]) ** 2).sum(1)) == y[i])
    assert correct / len(y) > 0.9


def test_pixels_are_the_float_images_rounded_to_uint8():
    # GPU runs load uint8 pixels (normalised on the device): (x + 1) * 127.5, rounded; the
    # project's normalisation brings them back to within half a grey level.
    from otface.data.datasets import normalize_images

    floats, pixels = SyntheticDataset(64, 8, seed=2), SyntheticDataset(64, 8, seed=2, pixels=True)
    x, label = floats[11]
    p, label_p = pixels[11]
    assert p.dtype == torch.uint8 and p.shape == x.shape and label == label_p
    expected = np.rint((x.numpy().astype(np.float64) + 1.0) * 127.5)
    assert np.array_equal(p.numpy(), expected.astype(np.uint8))
    assert (normalize_images(p) - x).abs().max() <= 0.5 / 127.5 + 1e-6
