"""Draws one synthetic face photo with OpenCV primitives and reports its five landmarks.

A face is drawn upright in the template frame (see :mod:`otface.demo.identity`) on a canvas
with a margin, then one affine warp places it in the output image: onto the ArcFace template
(plus pose jitter) for aligned 112×112 faces, or at a random place, size and angle in a larger
"loose crop". Landmarks are pushed through the same warp, so they agree with the pixels. Light,
blur, noise and occluders are applied after the warp.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import cv2
import numpy as np

from otface.demo.identity import (
    ARCFACE_TEMPLATE_112,
    FaceIdentity,
    Scene,
    Shot,
)
from otface.demo.parts import draw_face

__all__ = ["RenderedFace", "render_face", "similarity_fit"]

_FACE_CENTRE = np.array([56.0, 64.0])


class RenderedFace(NamedTuple):
    """One rendered photo.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        landmarks: (5, 2) float32 pixel coordinates (x, y) in ``image``: left eye, right eye,
            nose tip, left and right mouth corner.
    """

    image: np.ndarray
    landmarks: np.ndarray


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, shift) taking src to dst.

    Args:
        src: (N, 2) points.
        dst: (N, 2) points.

    Returns:
        (2, 3) float64 affine matrix ``M`` with ``dst ≈ src @ M[:, :2].T + M[:, 2]``.
    """
    z = src[:, 0] + 1j * src[:, 1]
    w = dst[:, 0] + 1j * dst[:, 1]
    zc, wc = z - z.mean(), w - w.mean()
    a = np.sum(wc * np.conj(zc)) / np.sum(np.abs(zc) ** 2)
    b = w.mean() - a * z.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def _similarity(angle_deg: float, scale: float, centre: np.ndarray, target: np.ndarray):
    """Affine (3, 3) rotating/scaling about ``centre`` and moving it to ``target``."""
    m = np.eye(3)
    m[:2] = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle_deg, scale)
    m[:2, 2] += np.asarray(target) - np.asarray(centre)
    return m


@lru_cache(maxsize=8)
def _ramps(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous (size, size) float32 maps of x and y, each running from -1 to 1."""
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return np.ascontiguousarray(np.tile(ramp, (size, 1))), np.ascontiguousarray(
        np.tile(ramp[:, None], (1, size))
    )


def _linear(size: int, angle: float, scale: float, offset: float) -> np.ndarray:
    """``offset + scale * (cos(angle) x + sin(angle) y)`` over the (size, size) ramps."""
    xs, ys = _ramps(size)
    return cv2.addWeighted(xs, scale * np.cos(angle), ys, scale * np.sin(angle), offset)


def _background(size: int, scene: Scene) -> np.ndarray:
    t = _linear(size, scene.background_angle, 0.5, 0.5)
    a, b = scene.background
    # a + t (b - a) stays inside [0, 255], so the absolute value taken here changes nothing
    planes = [cv2.convertScaleAbs(t, alpha=float(b[c] - a[c]), beta=float(a[c])) for c in range(3)]
    return cv2.merge(planes)


def _occlude(img: np.ndarray, lmk: np.ndarray, kind: str, q: np.ndarray) -> None:
    """Draws an occluder in place, placed relative to the output landmarks."""
    eye_l, eye_r, nose = lmk[0], lmk[1], lmk[2]
    along = eye_r - eye_l
    eye_dist = max(float(np.hypot(*along)), 1.0)
    d = along / eye_dist
    n = np.array([-d[1], d[0]])  # points down the face

    def local(points: np.ndarray, origin: np.ndarray) -> np.ndarray:
        pts = origin + points[:, :1] * d + points[:, 1:] * n
        return np.round(pts * 16).astype(np.int32)

    if kind == "bar":
        half_len = 0.5 + 0.25 + 0.12 * q[1]
        half_h = 0.13 + 0.09 * q[2]
        box = (
            np.array(
                [[-half_len, -half_h], [half_len, -half_h], [half_len, half_h], [-half_len, half_h]]
            )
            * eye_dist
        )
        centre = 0.5 * (eye_l + eye_r) + n * (q[0] - 0.5) * 4.0
        grey = 15.0 + 50.0 * q[3]
        cv2.fillPoly(img, [local(box, centre)], (grey, grey, grey * 1.1), cv2.LINE_AA, 4)
    elif kind == "patch":
        half = (0.35 + 0.35 * q[0]) * eye_dist
        centre = lmk.mean(axis=0) + (q[1:3] - 0.5) * 1.6 * eye_dist
        box = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
        pts = np.round((centre + box) * 16).astype(np.int32)
        cv2.fillPoly(img, [pts], tuple(float(c) for c in 255.0 * q[3:6]), cv2.LINE_AA, 4)
    elif kind == "mask":
        shape = np.array([[-0.95, -0.1], [0.95, -0.1], [0.85, 0.8], [0.0, 1.2], [-0.85, 0.8]])
        colour = (170.0 + 60.0 * q[3], 190.0 + 50.0 * q[4], 205.0 + 45.0 * q[5])
        cv2.fillPoly(img, [local(shape * eye_dist, nose)], colour, cv2.LINE_AA, 4)
    elif kind == "hand":
        centre = lmk[int(q[0] * 4.999)] + (q[1:3] - 0.5) * eye_dist
        axes = (int(16 * eye_dist * (0.5 + 0.3 * q[3])), int(16 * eye_dist * (0.35 + 0.15 * q[4])))
        tone = 0.3 + 0.7 * q[5]
        colour = (92.0 + 144.0 * tone, 60.0 + 140.0 * tone, 42.0 + 134.0 * tone)
        c16 = tuple(int(v) for v in np.round(centre * 16))
        cv2.ellipse(img, c16, axes, 180.0 * q[2], 0.0, 360.0, colour, -1, cv2.LINE_AA, 4)


def _photometric(img: np.ndarray, shot: Shot, scene: Scene, rng: np.random.Generator):
    """Directional light, exposure, colour cast, contrast, gamma, blur, sensor noise."""
    gain = _linear(
        img.shape[0], scene.light_angle, shot.brightness * scene.light_strength, shot.brightness
    )
    lit = img.astype(np.float32) * gain[..., None]
    balance = scene.white_balance.astype(np.float64)
    mean = float(np.mean(lit.mean(axis=(0, 1)) * balance))
    affine = np.zeros((3, 4))
    affine[np.arange(3), np.arange(3)] = balance * shot.contrast
    affine[:, 3] = mean * (1.0 - shot.contrast)
    lit = cv2.transform(lit, affine)
    out = np.clip(lit, 0.0, 255.0, out=lit).astype(np.uint8)
    lut = np.round(255.0 * (np.arange(256) / 255.0) ** shot.gamma).astype(np.uint8)
    out = cv2.LUT(out, lut)
    if shot.blur_sigma > 0.0:
        out = cv2.GaussianBlur(out, (0, 0), shot.blur_sigma)
    if shot.noise_sigma > 0.0:
        noisy = out + shot.noise_sigma * rng.standard_normal(out.shape, dtype=np.float32)
        out = np.clip(noisy + 0.5, 0.0, 255.0, out=noisy).astype(np.uint8)
    return out


def render_face(
    identity: FaceIdentity,
    shot: Shot,
    scene: Scene,
    rng: np.random.Generator,
    *,
    loose_size: int | None = None,
) -> RenderedFace:
    """Renders one photo of ``identity``.

    Args:
        identity: who is in the photo.
        shot: per-photo pose, expression, light and occlusion.
        scene: backdrop, clothes, light direction shared within one sitting.
        rng: generator for the sensor noise and loose-crop placement of this photo.
        loose_size: ``None`` for an aligned 112×112 face (landmarks near the ArcFace template,
            moved by the shot's pose jitter); an integer S for an unaligned S×S loose crop with
            the face at a random offset, size (1.0–1.4× the aligned face) and angle (±20°).

    Returns:
        :class:`RenderedFace` with the RGB image and its five landmarks.
    """
    margin = 12 if loose_size is None else 64
    canvas_size = 112 + 2 * margin
    canvas = _background(canvas_size, scene)
    canonical = draw_face(canvas, identity, shot, scene, margin=margin)  # canvas pixels

    align = np.eye(3)
    align[:2] = similarity_fit(canonical.astype(np.float64), ARCFACE_TEMPLATE_112)
    jitter = _similarity(shot.roll_deg, shot.scale, _FACE_CENTRE, _FACE_CENTRE + shot.shift)
    warp = jitter @ align
    out_size = 112
    if loose_size is not None:
        out_size = int(loose_size)
        angle = float(np.clip(rng.normal(0.0, 8.0), -20.0, 20.0))
        scale = rng.uniform(0.75, 1.1) * out_size / 176.0
        slack = max(0.0, 0.5 * out_size - 112.0 * scale * 0.5)
        target = 0.5 * out_size + rng.uniform(-1.0, 1.0, 2) * min(slack, 0.09 * out_size)
        warp = _similarity(angle, scale, _FACE_CENTRE, target) @ warp
    img = cv2.warpAffine(
        canvas,
        warp[:2],
        (out_size, out_size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT_101,
    )
    lmk = canonical @ warp[:2, :2].T + warp[:2, 2]
    if shot.occlusion:
        _occlude(img, lmk, shot.occlusion, shot.occlusion_params)
    img = _photometric(img, shot, scene, rng)
    return RenderedFace(image=img, landmarks=lmk.astype(np.float32))
