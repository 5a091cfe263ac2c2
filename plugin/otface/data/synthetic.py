"""Synthetic training data: deterministic random images, no files.

Image ``i`` depends only on ``(seed, i)``: a coarse 8×8 colour pattern shared by its identity plus
per-image noise, so the data is cheap, reproducible in every worker, and learnable enough for
smoke tests. It stands in for ``rec = "synthetic"`` of arcface_torch (a throughput test).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from otface.data.datasets import IMAGE_SIZE

__all__ = ["SyntheticDataset", "synthetic_labels"]

_CELL = IMAGE_SIZE // 8  # 14-pixel cells of the identity pattern


def synthetic_labels(num_image: int, num_classes: int, *, seed: int) -> np.ndarray:
    """Labels of the synthetic set: each identity gets ``num_image // num_classes`` or one more
    images, assigned to indices in a seeded random order. int64 ``(num_image,)``."""
    if num_image < 1 or num_classes < 1:
        raise ValueError(
            f"synthetic data needs num_image >= 1 and num_classes >= 1, got num_image="
            f"{num_image}, num_classes={num_classes}"
        )
    rng = np.random.default_rng([seed, 0x5EED])
    labels = np.arange(num_image, dtype=np.int64) % num_classes
    return labels[rng.permutation(num_image)]


class SyntheticDataset(Dataset):
    """``num_image`` generated images of ``num_classes`` identities.

    Args:
        num_image: dataset length.
        num_classes: number of identities (labels ``0..num_classes-1``).
        seed: everything is a function of ``(seed, index)``.
    """

    def __init__(self, num_image: int, num_classes: int, *, seed: int = 0) -> None:
        self.num_image = int(num_image)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.labels = synthetic_labels(self.num_image, self.num_classes, seed=self.seed)

    def __len__(self) -> int:
        return self.num_image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_image:
            raise IndexError(f"synthetic index {index} outside [0, {self.num_image})")
        label = int(self.labels[index])
        pattern = np.random.default_rng([self.seed, 1, label]).uniform(-0.8, 0.8, (3, 8, 8))
        img = np.repeat(np.repeat(pattern, _CELL, axis=1), _CELL, axis=2)
        noise = np.random.default_rng([self.seed, 2, index]).standard_normal(img.shape)
        img = np.clip(img + 0.2 * noise, -1.0, 1.0).astype(np.float32)
        return torch.from_numpy(img), torch.tensor(label, dtype=torch.int64)
