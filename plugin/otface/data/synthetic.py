"""Synthetic training data: deterministic generated images, no files, hard triplets included.

Image ``i`` of identity ``y`` depends only on ``(seed, i)``::

    x_i = clip(a_i * shift(T_y, d_i) + w_i * L_{j_i} + b_i + sigma * noise_i, -1, 1)

* ``T_y``, the identity template: a smooth random colour image (an 8×8 pattern, bilinearly
  upsampled), the same for every image of ``y``, mixed with the pattern of its family of
  look-alikes (``y mod 16``), so that a batch holds hard negatives after the lighting is learnt;
* ``shift(., d_i)``, a small circular translation (a "pose"), ``|d| <= 6`` pixels;
* ``L_j``, a "lighting" pattern from a small bank shared by all identities (smooth, as large as
  a template), picked per image and weighted by ``w_i``; ``a_i`` (contrast), ``b_i``
  (brightness) and the pixel noise (a window at a random offset of one shared Gaussian field)
  are per image too.

Two images of one identity under different lightings can be less alike than two images of
different identities under the same lighting, as with real faces: a P×K batch holds hard
triplets (``S_an > S_ap``) in pixel space and for an untrained network, so the OTFace term runs
from the first step. The lighting spans a space of ``_N_LIGHTS`` patterns a network can learn to
ignore, and the template carries the identity, so the data stays learnable.

Cheap (about 3,000 images/s on one CPU core) and reproducible in every worker: one generator
per image, no per-identity state, the lighting bank and noise field built once per process. It
stands in for ``rec = "synthetic"`` of arcface_torch (a throughput test). Each identity needs at
least ``sampler.k`` images (``num_image >= k * num_classes``): the P×K sampler otherwise repeats
one index, i.e. one identical image, and nothing can be hard.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from otface.data.datasets import IMAGE_SIZE

__all__ = ["SyntheticDataset", "synthetic_labels"]

_GRID = 8  # the template and lighting patterns are 8×8, upsampled to 112×112
_N_LIGHTS = 8  # lighting patterns shared by all identities
_MAX_SHIFT_PX = 3
_NOISE_STD = 0.1
_NOISE_MARGIN_PX = 48  # a window of a (112 + 48)² noise field: 49² different offsets
# Template and lighting amplitudes are equal: a different lighting moves an image about as far as
# a different identity does, which is what makes some hardest negatives closer than some hardest
# positives.
_AMPLITUDE = 0.5
# Identities come in families, "look-alikes" whose templates share a pattern: a P×K batch of 32
# identities holds about two of each of the 16 families, whose hard negatives stay hard long
# after the network has learnt to ignore the lighting. _OWN is the weight of each identity's
# own pattern (templates of one family have cosine about 1 - _OWN^2).
_N_FAMILIES = 16
_OWN = 0.6


def _smooth_patterns(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` smooth random images, float32 ``(count, 3, 112, 112)`` in about [-A, A]."""
    grids = rng.uniform(-_AMPLITUDE, _AMPLITUDE, (count, _GRID, _GRID, 3)).astype(np.float32)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    up = [cv2.resize(g, size, interpolation=cv2.INTER_LINEAR) for g in grids]
    return np.ascontiguousarray(np.stack(up).transpose(0, 3, 1, 2))


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
    """``num_image`` generated images of ``num_classes`` identities, float32 ``(3, 112, 112)``
    in ``[-1, 1]``.

    Args:
        num_image: dataset length.
        num_classes: number of identities (labels ``0..num_classes-1``).
        seed: everything is a function of ``(seed, index)``.
        pixels: ``True`` returns ``uint8`` pixels ``round((x + 1) * 127.5)`` instead, as a
            ``.rec`` set does for GPU runs (4x fewer bytes to pin and copy; normalised on the
            device by :func:`otface.data.datasets.normalize_images`).
    """

    def __init__(
        self, num_image: int, num_classes: int, *, seed: int = 0, pixels: bool = False
    ) -> None:
        self.pixels = bool(pixels)
        self.num_image = int(num_image)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.labels = synthetic_labels(self.num_image, self.num_classes, seed=self.seed)
        # Shared by all images, built on first use in each worker.
        self._lights: np.ndarray | None = None
        self._families: np.ndarray | None = None
        self._noise_field: np.ndarray | None = None

    def __len__(self) -> int:
        return self.num_image

    def template(self, label: int) -> np.ndarray:
        """The identity template ``T_label``, float32 ``(3, 112, 112)``: its family's pattern
        and its own, ``sqrt(1 - r^2) F + r O`` with ``r = _OWN``."""
        own = _smooth_patterns(np.random.default_rng([self.seed, 1, int(label)]), 1)[0]
        family = self.families()[int(label) % _N_FAMILIES]
        return family * np.float32(np.sqrt(1.0 - _OWN**2)) + own * np.float32(_OWN)

    def families(self) -> np.ndarray:
        """The family patterns, float32 ``(_N_FAMILIES, 3, 112, 112)``."""
        if self._families is None:
            rng = np.random.default_rng([self.seed, 5])
            self._families = _smooth_patterns(rng, _N_FAMILIES)
        return self._families

    def lights(self) -> np.ndarray:
        """The shared lighting bank, float32 ``(_N_LIGHTS, 3, 112, 112)``."""
        if self._lights is None:
            self._lights = _smooth_patterns(np.random.default_rng([self.seed, 3]), _N_LIGHTS)
        return self._lights

    def _noise(self) -> np.ndarray:
        # Drawing 37,632 Gaussians per image took half the time of an item; a window of one
        # shared noise field at a random offset is as good a per-image perturbation, 20x cheaper.
        if self._noise_field is None:
            side = IMAGE_SIZE + _NOISE_MARGIN_PX
            rng = np.random.default_rng([self.seed, 4])
            field = rng.standard_normal((3, side, side), dtype=np.float32)
            self._noise_field = field * np.float32(_NOISE_STD)
        return self._noise_field

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_image:
            raise IndexError(f"synthetic index {index} outside [0, {self.num_image})")
        label = int(self.labels[index])
        rng = np.random.default_rng([self.seed, 2, index])
        contrast = rng.uniform(0.8, 1.0)
        light_weight = rng.uniform(0.4, 0.8)
        brightness = rng.uniform(-0.15, 0.15)
        dy, dx = rng.integers(-_MAX_SHIFT_PX, _MAX_SHIFT_PX + 1, 2)
        light = self.lights()[rng.integers(_N_LIGHTS)]
        oy, ox = rng.integers(0, _NOISE_MARGIN_PX + 1, 2)
        img = np.roll(self.template(label), (int(dy), int(dx)), axis=(1, 2))
        img *= np.float32(contrast)
        img += light * np.float32(light_weight)
        img += self._noise()[:, oy : oy + IMAGE_SIZE, ox : ox + IMAGE_SIZE]
        img += np.float32(brightness)
        np.clip(img, -1.0, 1.0, out=img)
        if self.pixels:
            img = np.rint((img + 1.0) * np.float32(127.5)).astype(np.uint8)
        return torch.from_numpy(img), torch.tensor(label, dtype=torch.int64)
