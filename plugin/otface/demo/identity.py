"""Random parameters of the synthetic demo faces: who someone is, and how one photo differs.

All lengths are pixels in the *template frame*: the 112×112 aligned-face frame of ArcFace, where
the five reference landmarks sit at :data:`ARCFACE_TEMPLATE_112`. An identity fixes geometry,
colours and skin texture; a :class:`Shot` fixes everything that changes from photo to photo
(pose, expression, light, blur, noise, occlusion); a :class:`Scene` holds what photos taken in one
sitting share (background, clothes, light direction), so that frames of one "video" look alike.

Everything is drawn from ``numpy.random.Generator`` objects that the caller seeds, so a face is a
pure function of its seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from otface.landmarks import ARCFACE_TEMPLATE_112

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "FaceIdentity",
    "Scene",
    "Shot",
    "sample_identity",
    "sample_scene",
    "sample_shot",
]

# Identity texture field covers the template frame with this margin (pixels) on every side.
FIELD_MARGIN = 8
FIELD_SIZE = 112 + 2 * FIELD_MARGIN

HAIR_STYLES = ("short", "long", "bald", "fringe", "curly")
_HAIR_STYLE_P = (0.34, 0.25, 0.08, 0.18, 0.15)
_HAIR_PALETTE = np.array(
    [[25, 20, 18], [60, 40, 28], [105, 70, 40], [190, 150, 95], [150, 70, 35], [150, 148, 145]],
    dtype=np.float32,
)
_HAIR_P = (0.32, 0.26, 0.16, 0.1, 0.07, 0.09)
_IRIS_PALETTE = np.array(
    [[70, 45, 25], [35, 25, 20], [70, 110, 160], [80, 115, 70], [110, 115, 120]],
    dtype=np.float32,
)
_IRIS_P = (0.35, 0.25, 0.17, 0.12, 0.11)
_SKIN_LIGHT = np.array([236, 200, 176], dtype=np.float32)
_SKIN_DARK = np.array([92, 60, 42], dtype=np.float32)


@dataclass(frozen=True)
class FaceIdentity:
    """Everything that makes one synthetic person look like themself (template-frame pixels).

    Colours are RGB float32 arrays of shape (3,) in [0, 255]. ``skin_field`` (FIELD_SIZE,
    FIELD_SIZE) float32 is a multiplicative skin-shading map over the template frame expanded by
    ``FIELD_MARGIN`` pixels on each side; ``moles`` is (M, 3): x, y, radius.
    """

    face_cx: float
    face_cy: float
    face_half_w: float
    face_half_h: float
    chin_exponent: float
    crown_exponent: float
    jaw_ratio: float
    eye_y: float
    eye_half_gap: float
    eye_half_w: float
    eye_half_h: float
    eye_tilt_deg: float
    iris_r: float
    brow_gap: float
    brow_thickness: float
    brow_half_len: float
    brow_arch: float
    brow_slope: float
    nose_y: float
    nose_half_w: float
    mouth_y: float
    mouth_half_w: float
    lip_upper: float
    lip_lower: float
    ear_half_h: float
    hair_style: str
    hairline_y: float
    hairline_curve: float
    hair_volume: float
    hair_side_y: float
    hair_part: float
    long_hair_len: float
    beard: bool
    moustache: bool
    glasses: bool
    glasses_round: bool
    skin: np.ndarray
    hair: np.ndarray
    iris: np.ndarray
    lips: np.ndarray
    frame: np.ndarray
    skin_field: np.ndarray
    moles: np.ndarray


class Scene(NamedTuple):
    """What photos taken in one sitting share: backdrop, clothes, light direction, colour cast."""

    background: np.ndarray  # (2, 3) RGB end colours of a linear gradient
    background_angle: float
    clothes: np.ndarray  # (3,) RGB
    light_angle: float
    light_strength: float
    white_balance: np.ndarray  # (3,) per-channel gains


class Shot(NamedTuple):
    """Per-photo nuisance: pose, expression, photometric changes and occlusion."""

    roll_deg: float
    yaw: float  # -1 … 1, horizontal turn
    scale: float
    shift: np.ndarray  # (2,) pixels
    eye_open: float
    gaze: np.ndarray  # (2,) pixels
    brow_raise: float
    smile: float
    mouth_open: float
    hair_jitter: np.ndarray  # (2,) pixels
    brightness: float
    contrast: float
    gamma: float
    blur_sigma: float
    noise_sigma: float
    occlusion: str  # "", "bar", "patch", "mask", "hand"
    occlusion_params: np.ndarray  # (6,) uniforms in [0, 1] that place and colour the occluder


def _skin_field(rng: np.random.Generator, geo: dict) -> np.ndarray:
    """Smooth identity-specific mottling times a fixed 3-D-looking falloff toward the face edge."""
    grid = rng.normal(size=(6, 6)).astype(np.float32)
    noise = cv2.resize(grid, (FIELD_SIZE, FIELD_SIZE), interpolation=cv2.INTER_CUBIC)
    coords = np.arange(FIELD_SIZE, dtype=np.float32) - FIELD_MARGIN
    dx = (coords[None, :] - geo["face_cx"]) / geo["face_half_w"]
    dy = (coords[:, None] - geo["face_cy"]) / geo["face_half_h"]
    falloff = 1.0 - 0.22 * np.clip(dx * dx + dy * dy, 0.0, 1.5) ** 2
    return (falloff * (1.0 + rng.uniform(0.04, 0.11) * noise)).astype(np.float32)


def sample_identity(rng: np.random.Generator) -> FaceIdentity:
    """Draws one synthetic identity.

    Args:
        rng: generator seeded for this identity only (so identities do not depend on order).

    Returns:
        A :class:`FaceIdentity` whose landmarks lie near :data:`ARCFACE_TEMPLATE_112`.
    """
    u = rng.uniform
    t = ARCFACE_TEMPLATE_112
    geo = {
        "face_cx": 56.0 + rng.normal(0.0, 0.6),
        "face_cy": 60.0 + u(-3.0, 3.0),
        "face_half_w": u(34.0, 43.0),
        "face_half_h": u(47.0, 57.0),
    }
    tone = rng.beta(1.6, 1.6)
    skin = _SKIN_LIGHT * (1.0 - tone) + _SKIN_DARK * tone + rng.normal(0.0, 7.0, 3)
    skin[0] += u(0.0, 12.0)  # a little more red than the straight interpolation
    hair = _HAIR_PALETTE[rng.choice(len(_HAIR_P), p=_HAIR_P)] * u(0.8, 1.2, 3)
    iris = _IRIS_PALETTE[rng.choice(len(_IRIS_P), p=_IRIS_P)] * u(0.8, 1.2, 3)
    lips = skin * u(0.68, 0.86) + np.array([u(10.0, 35.0), 0.0, u(0.0, 10.0)])
    style = HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=_HAIR_STYLE_P)]
    n_moles = int(rng.poisson(1.2))
    freckles = int(rng.random() < 0.18) * int(rng.integers(15, 40))
    moles = np.concatenate(
        [
            np.stack([u(28, 84, n_moles), u(40, 100, n_moles), u(0.8, 1.8, n_moles)], axis=1),
            np.stack([u(32, 80, freckles), u(55, 78, freckles), np.full(freckles, 0.6)], axis=1),
        ]
    ).astype(np.float32)
    eye_half_gap = 0.5 * (t[1, 0] - t[0, 0]) * u(0.88, 1.12)
    return FaceIdentity(
        **geo,
        chin_exponent=u(1.5, 2.6),
        crown_exponent=u(2.0, 3.0),
        jaw_ratio=u(0.78, 1.0),
        eye_y=t[0, 1] + u(-3.0, 3.0),
        eye_half_gap=eye_half_gap,
        eye_half_w=u(5.0, 7.8),
        eye_half_h=u(2.3, 3.8),
        eye_tilt_deg=u(-9.0, 9.0),
        iris_r=u(2.2, 3.3),
        brow_gap=u(6.0, 11.0),
        brow_thickness=u(1.4, 3.8),
        brow_half_len=u(5.5, 9.0),
        brow_arch=u(-0.5, 3.0),
        brow_slope=u(-0.15, 0.15),
        nose_y=t[2, 1] + u(-3.5, 3.5),
        nose_half_w=u(4.0, 7.5),
        mouth_y=t[3, 1] + u(-3.5, 3.5),
        mouth_half_w=0.5 * (t[4, 0] - t[3, 0]) * u(0.8, 1.2),
        lip_upper=u(1.2, 3.5),
        lip_lower=u(1.8, 4.5),
        ear_half_h=u(6.0, 10.0),
        hair_style=style,
        hairline_y=u(16.0, 30.0) if style != "fringe" else u(30.0, 40.0),
        hairline_curve=u(-5.0, 9.0),
        hair_volume=u(2.0, 10.0),
        hair_side_y=u(38.0, 52.0),
        hair_part=u(-1.0, 1.0),
        long_hair_len=u(0.3, 1.1),
        beard=bool(rng.random() < 0.18),
        moustache=bool(rng.random() < 0.18),
        glasses=bool(rng.random() < 0.12),
        glasses_round=bool(rng.random() < 0.5),
        skin=np.clip(skin, 30, 250).astype(np.float32),
        hair=np.clip(hair, 5, 250).astype(np.float32),
        iris=np.clip(iris, 5, 250).astype(np.float32),
        lips=np.clip(lips, 20, 250).astype(np.float32),
        frame=rng.choice([20.0, 60.0, 120.0, 170.0]) * u(0.7, 1.3, 3).astype(np.float32),
        skin_field=_skin_field(rng, geo),
        moles=moles,
    )


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draws the shared conditions of one sitting (one "media" in IJB terms)."""
    return Scene(
        background=rng.uniform(20.0, 235.0, size=(2, 3)).astype(np.float32),
        background_angle=rng.uniform(0.0, 2.0 * np.pi),
        clothes=rng.uniform(15.0, 230.0, size=3).astype(np.float32),
        light_angle=rng.uniform(0.0, 2.0 * np.pi),
        light_strength=rng.uniform(0.0, 0.55),
        white_balance=(1.0 + rng.normal(0.0, 0.07, 3)).astype(np.float32),
    )


def sample_shot(rng: np.random.Generator, *, occlusion_p: float = 0.2) -> Shot:
    """Draws the nuisance of one photo.

    Args:
        rng: generator seeded for this photo.
        occlusion_p: probability that something covers part of the face.
    """
    u = rng.uniform
    occlusion = ""
    if rng.random() < occlusion_p:
        occlusion = str(rng.choice(["bar", "patch", "mask", "hand"], p=[0.25, 0.35, 0.2, 0.2]))
    blinking = rng.random() < 0.08
    return Shot(
        roll_deg=float(np.clip(rng.normal(0.0, 4.0), -10.0, 10.0)),
        yaw=float(np.clip(rng.normal(0.0, 0.45), -1.0, 1.0)),
        scale=float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1)),
        shift=np.clip(rng.normal(0.0, 1.3, 2), -4.0, 4.0),
        eye_open=u(0.0, 0.25) if blinking else u(0.55, 1.1),
        gaze=rng.normal(0.0, 0.6, 2),
        brow_raise=u(-1.0, 3.0),
        smile=u(-1.5, 4.5),
        mouth_open=0.0 if rng.random() < 0.65 else u(1.0, 6.0),
        hair_jitter=rng.normal(0.0, 1.0, 2),
        brightness=u(0.7, 1.25),
        contrast=u(0.7, 1.2),
        gamma=u(0.8, 1.25),
        blur_sigma=0.0 if rng.random() < 0.4 else u(0.3, 1.6),
        noise_sigma=u(0.0, 9.0),
        occlusion=occlusion,
        occlusion_params=rng.random(6),
    )
