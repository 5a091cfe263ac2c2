"""Seeded photos of the demo identities, and their JPEG bytes.

Every photo is a pure function of ``(seed, stream, *key)``: each use of random numbers has its
own stream number, so no two parts of the data set share draws and adding a part changes no
other part.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import cv2
import numpy as np

from otface.demo.identity import (
    FaceIdentity,
    Scene,
    Shot,
    sample_identity,
    sample_scene,
    sample_shot,
)
from otface.demo.render import RenderedFace, render_face

__all__ = [
    "Stream",
    "rng_for",
    "encode_jpeg",
    "identities",
    "photo",
    "Condition",
]

#: Changes a drawn shot and scene into a harder one: ``(shot, scene, rng) → (shot, scene)``.
Condition = Callable[[Shot, Scene, np.random.Generator], Tuple[Shot, Scene]]

JPEG_QUALITY = 95


class Stream:
    """Stream numbers of the seed sequences (never reuse or renumber one: the bytes change)."""

    IDENTITY = 0
    TRAIN = 1
    VAL = 2
    VAL_PAIRS = 3
    IJB_LAYOUT = 4
    IJB_MEDIA = 5
    IJB_IMAGE = 6
    HARD = 7
    HARD_PAIRS = 8
    IJB_1N = 9
    MASK = 10
    MASK_PAIRS = 11
    CROP = 12
    CROP_PAIRS = 13
    CROP_WINDOW = 14
    TRAIN_OCCLUSION = 15
    IJB_OCCLUDED = 16


def rng_for(*key: int) -> np.random.Generator:
    """A generator seeded by the integer sequence ``key``."""
    return np.random.default_rng([int(k) for k in key])


def encode_jpeg(face: RenderedFace) -> bytes:
    """JPEG bytes (quality 95) of a rendered RGB face."""
    ok, buf = cv2.imencode(".jpg", face.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a demo image as JPEG")
    return buf.tobytes()


def identities(seed: int, start: int, count: int) -> list[FaceIdentity]:
    """Identities number ``start … start + count - 1`` (each from its own seed)."""
    return [sample_identity(rng_for(seed, Stream.IDENTITY, start + i)) for i in range(count)]


def photo(
    seed: int, stream: int, idn: FaceIdentity, *key: int, condition: Optional[Condition] = None
) -> RenderedFace:
    """Aligned photo ``key`` of ``idn`` from ``stream``.

    The shot, the scene and then the rendering noise are drawn from one generator seeded by
    ``(seed, stream, *key)``; ``condition``, when given, rewrites the shot and scene (drawing
    from the same generator) before rendering.
    """
    rng = rng_for(seed, stream, *key)
    shot, scene = sample_shot(rng), sample_scene(rng)
    if condition is not None:
        shot, scene = condition(shot, scene, rng)
    return render_face(idn, shot, scene, rng)
