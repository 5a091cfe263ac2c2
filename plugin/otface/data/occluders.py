"""Occlusion augmentation: procedural occluders drawn on aligned training faces.

``config.augment.occlusion_p`` is the probability that a training image gets one occluder,
of a kind drawn uniformly from ``config.augment.occluders``:

* ``"mask"``: a face mask over nose, mouth and chin (the ICCV21-MFR mask track's condition);
* ``"bar"``: a dark band over the eyes (sunglasses);
* ``"patch"``: a rectangle of random colour anywhere on the face (random erasing);
* ``"hand"``: a skin-toned ellipse over the mouth or a cheek.

Faces are aligned to the ArcFace five-point template, so where eyes, nose and mouth are is
known; each occluder's shape, size, position and colour are drawn around those points. The
draws come from torch's generator, which the DataLoader seeds per worker, so a run repeats
exactly as its flips do.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

__all__ = ["OCCLUDERS", "OcclusionAugment", "draw_occluder"]

#: The occluder kinds, in the order ``config.augment.occluders`` may name them.
OCCLUDERS = ("mask", "bar", "patch", "hand")

# ArcFace's 112×112 template: left eye, right eye, nose tip, mouth corners (x, y).
_EYES_Y, _NOSE_Y, _MOUTH_Y = 51.6, 71.7, 92.3


def _colour(rng: np.random.Generator, kind: str) -> tuple:
    if kind == "bar":  # sunglasses: dark
        return tuple(int(v) for v in rng.integers(0, 60, 3))
    if kind == "hand":  # skin tones, from pale to dark
        t = rng.random()
        base = np.array([235, 200, 170]) * (1 - t) + np.array([95, 60, 40]) * t
        return tuple(int(v) for v in np.clip(base + rng.normal(0, 8, 3), 0, 255))
    if kind == "mask" and rng.random() < 0.5:  # surgical blue / white half the time
        return (int(rng.integers(150, 200)), int(rng.integers(200, 235)), 240)
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def draw_occluder(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A copy of an aligned ``(H, W, 3)`` uint8 face with one occluder of ``kind`` drawn on it.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind not in OCCLUDERS:
        raise ValueError(f"unknown occluder {kind!r}; valid: {', '.join(OCCLUDERS)}")
    out = np.ascontiguousarray(image).copy()
    s = image.shape[0] / 112.0  # the template's coordinates scale with the image
    colour = _colour(rng, kind)
    if kind == "mask":
        top = _NOSE_Y - rng.uniform(8, 16)  # from the nose bridge …
        chin = rng.uniform(104, 114)  # … over the chin
        left, right = rng.uniform(18, 28), rng.uniform(84, 94)
        pts = np.array(
            [
                [left, top + 6],
                [56 + rng.uniform(-3, 3), top],
                [right, top + 6],
                [right - 2, _MOUTH_Y + 6],
                [56 + rng.uniform(-3, 3), chin],
                [left + 2, _MOUTH_Y + 6],
            ]
        )
        cv2.fillPoly(out, [np.round(pts * s).astype(np.int32)], colour, lineType=cv2.LINE_AA)
    elif kind == "bar":
        half = rng.uniform(6, 11)
        y = _EYES_Y + rng.uniform(-3, 3)
        x0, x1 = rng.uniform(16, 28), rng.uniform(84, 96)
        p0 = (round(x0 * s), round((y - half) * s))
        p1 = (round(x1 * s), round((y + half) * s))
        cv2.rectangle(out, p0, p1, colour, thickness=-1)
    elif kind == "patch":
        w, h = rng.uniform(22, 48, 2)
        cx, cy = rng.uniform(30, 82), rng.uniform(40, 96)
        p0 = (round((cx - w / 2) * s), round((cy - h / 2) * s))
        p1 = (round((cx + w / 2) * s), round((cy + h / 2) * s))
        cv2.rectangle(out, p0, p1, colour, thickness=-1)
    else:  # hand
        centre = (rng.uniform(36, 76) * s, rng.uniform(_NOSE_Y, _MOUTH_Y + 10) * s)
        axes = (rng.uniform(18, 30) * s, rng.uniform(11, 20) * s)
        angle = rng.uniform(-40, 40)
        cv2.ellipse(
            out,
            (round(centre[0]), round(centre[1])),
            (round(axes[0]), round(axes[1])),
            angle,
            0,
            360,
            colour,
            thickness=-1,
            lineType=cv2.LINE_AA,
        )
    return out


class OcclusionAugment:
    """Draws an occluder on a ``(3, H, W)`` uint8 RGB tensor with probability ``p``.

    Args:
        p: probability of an occluder, in [0, 1].
        occluders: kinds to draw from (uniformly), a subset of :data:`OCCLUDERS`.
    """

    def __init__(self, p: float, occluders: Sequence[str] = OCCLUDERS) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment.occlusion_p must be in [0, 1], got {p}")
        unknown = [k for k in occluders if k not in OCCLUDERS]
        if unknown or not occluders:
            raise ValueError(
                f"augment.occluders must be a non-empty list of {', '.join(OCCLUDERS)}; "
                f"got {list(occluders)}"
            )
        self.p, self.occluders = float(p), tuple(occluders)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or float(torch.rand(())) >= self.p:
            return image
        # One seed from torch's (per-worker) generator drives the occluder's shape.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
        kind = self.occluders[int(rng.integers(len(self.occluders)))]
        hwc = image.permute(1, 2, 0).numpy()
        return torch.from_numpy(draw_occluder(hwc, kind, rng)).permute(2, 0, 1).contiguous()
