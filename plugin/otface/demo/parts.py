"""Draws the parts of one upright synthetic face (hair, head, eyes, brows, nose, mouth, extras).

Coordinates are template-frame pixels shifted by the canvas margin. Drawing uses OpenCV's
anti-aliased primitives with 4 fractional bits (``shift=4``), so sub-pixel geometry survives.
A horizontal turn (``shot.yaw``) is faked the cheap way: the face narrows and each part slides
sideways in proportion to how far it sticks out of the face (the nose tip most).
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from otface.demo.identity import FIELD_MARGIN, FIELD_SIZE, FaceIdentity, Scene, Shot

__all__ = ["draw_face"]

_AA = cv2.LINE_AA
_SHIFT = 4
_ONE = 1 << _SHIFT
_SCLERA = (238.0, 234.0, 228.0)


def _fx(points: np.ndarray) -> np.ndarray:
    """Float pixel coordinates to OpenCV fixed point (``shift=4``)."""
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32)


def _c(colour) -> tuple[float, float, float]:
    if np.ndim(colour) == 0:
        v = min(max(float(colour), 0.0), 255.0)
        return (v, v, v)
    r, g, b = (min(max(float(v), 0.0), 255.0) for v in colour)
    return (r, g, b)


def _ellipse(img, centre, axes, angle, colour, thickness=-1, start=0.0, end=360.0) -> None:
    ax = (max(int(round(axes[0] * _ONE)), 1), max(int(round(axes[1] * _ONE)), 1))
    c = (int(round(float(centre[0]) * _ONE)), int(round(float(centre[1]) * _ONE)))
    cv2.ellipse(
        img, c, ax, float(angle), float(start), float(end), _c(colour), thickness, _AA, _SHIFT
    )


def _poly(img, points, colour) -> None:
    cv2.fillPoly(img, [_fx(points)], _c(colour), _AA, _SHIFT)


def _bezier(p0, mid, p2, n: int = 9) -> np.ndarray:
    """Quadratic curve from p0 to p2 passing through ``mid`` at its half-way point; (n, 2)."""
    p0, mid, p2 = (np.asarray(p, dtype=np.float64) for p in (p0, mid, p2))
    ctrl = 2.0 * mid - 0.5 * (p0 + p2)
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * ctrl + t**2 * p2


class _Frame(NamedTuple):
    """Where things go on this canvas: margin offset, face centre and the yaw warp."""

    off: float
    cx: float
    cy: float
    yaw: float

    def x(self, x, depth: float = 0.0):
        """Template x to canvas x for a point ``depth`` pixels out of the face plane."""
        return self.off + self.cx + (x - self.cx) * (1.0 - 0.1 * abs(self.yaw)) + self.yaw * depth

    def y(self, y):
        return self.off + y


def _outline(idn: FaceIdentity, fr: _Frame, n: int = 64) -> np.ndarray:
    """Head outline, a super-ellipse that narrows toward the jaw; (n, 2) canvas points.

    Point k sits at angle 2πk/n: k = 0 on the right cheek, n/4 at the chin, n/2 on the left.
    """
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    lower = s > 0
    ex = 2.0 / np.where(lower, idn.chin_exponent, idn.crown_exponent)
    width = idn.face_half_w * np.where(lower, 1.0 - (1.0 - idn.jaw_ratio) * s, 1.0)
    x = idn.face_cx + np.sign(c) * np.abs(c) ** ex * width
    y = idn.face_cy + np.sign(s) * np.abs(s) ** ex * idn.face_half_h
    return np.stack([fr.x(x), fr.y(y)], axis=1)


def _hairline(idn: FaceIdentity, fr: _Frame, x: np.ndarray) -> np.ndarray:
    u = (x - fr.off - idn.face_cx) / idn.face_half_w
    y = idn.hairline_y + idn.hairline_curve * u * u + 3.0 * idn.hair_part * u
    if idn.hair_style == "fringe":
        y = y + 2.5 * np.abs(np.sin(1.7 * (x - fr.off) + 3.0 * idn.hair_part))
    return fr.y(y)


def _draw_hair(img, idn: FaceIdentity, shot: Shot, fr: _Frame, outline, back: bool) -> None:
    centre = np.array([fr.x(idn.face_cx), fr.y(idn.face_cy)])
    rel = outline - centre
    radius = np.hypot(rel[:, 0], rel[:, 1])[:, None]
    grow = idn.hair_volume + (3.0 if back else 0.0)
    outer = centre + rel * (1.0 + grow / radius) + shot.hair_jitter - np.array([fr.yaw * 2.0, 0])
    n = len(outline)
    if back:  # long hair behind the head, down past the jaw
        top = outer[n // 2 : n]  # left cheek → crown → right cheek
        bottom = fr.y(idn.face_cy + idn.face_half_h * idn.long_hair_len)
        half = idn.face_half_w + idn.hair_volume + 5.0
        ends = np.array([[fr.x(idn.face_cx - half), bottom], [fr.x(idn.face_cx + half), bottom]])
        _poly(img, np.concatenate([ends[:1], top, ends[1:]]), idn.hair * 0.85)
        return
    keep = np.arange(n // 2, n)
    keep = keep[outline[keep, 1] < fr.y(idn.hair_side_y)]
    if len(keep) < 3:
        return
    inner = centre + rel[keep] * (1.0 - 2.5 / radius[keep])
    inner[:, 1] = np.maximum(inner[:, 1], _hairline(idn, fr, inner[:, 0]))
    _poly(img, np.concatenate([outer[keep], inner[::-1]]), idn.hair)
    if idn.hair_style == "curly":
        for p in outer[keep][::2]:
            _ellipse(img, p, (2.0 + 0.6 * idn.hair_volume,) * 2, 0.0, idn.hair * 0.92)


def _draw_eye(img, idn: FaceIdentity, shot: Shot, fr: _Frame, side: int) -> np.ndarray:
    ex = fr.x(idn.face_cx + side * idn.eye_half_gap, 3.5)
    ey = fr.y(idn.eye_y)
    centre = np.array([ex, ey])
    w = idn.eye_half_w * (1.0 - 0.2 * fr.yaw * side)
    h = idn.eye_half_h * shot.eye_open
    angle = -side * idn.eye_tilt_deg
    lash = idn.hair * 0.35
    if h < 0.8:
        _ellipse(img, centre, (w, 1.0), angle, lash, 1, 0.0, 180.0)
        return centre
    _ellipse(img, centre, (w, h), angle, _SCLERA)
    iris_c = centre + shot.gaze
    r = idn.iris_r
    _ellipse(img, iris_c, (r, min(r, 0.95 * h)), 0.0, idn.iris)
    _ellipse(img, iris_c, (0.45 * r, min(0.45 * r, 0.9 * h)), 0.0, 12.0)
    _ellipse(img, iris_c + np.array([0.35 * r, -0.35 * r]), (0.6, 0.6), 0.0, 250.0)
    _ellipse(img, centre, (w, h), angle, lash, 1, 180.0, 360.0)
    _ellipse(img, centre, (w, h), angle, idn.skin * 0.72, 1, 0.0, 180.0)
    return centre


def _draw_brow(img, idn: FaceIdentity, shot: Shot, fr: _Frame, side: int) -> None:
    half = idn.brow_half_len
    bx = idn.face_cx + side * (idn.eye_half_gap + 1.0)
    by = idn.eye_y - idn.brow_gap - shot.brow_raise
    u = np.linspace(-1.0, 1.0, 9)
    xs = fr.x(bx + u * half, 3.5)
    ys = fr.y(by - idn.brow_arch * (1.0 - u * u) + side * idn.brow_slope * u * half)
    thick = idn.brow_thickness * (1.0 - 0.25 * (side * u + 1.0))
    top = np.stack([xs, ys - 0.5 * thick], axis=1)
    bottom = np.stack([xs, ys + 0.5 * thick], axis=1)[::-1]
    _poly(img, np.concatenate([top, bottom]), idn.hair * 0.75)


def _draw_nose(img, idn: FaceIdentity, fr: _Frame) -> np.ndarray:
    tip = np.array([fr.x(idn.face_cx, 7.0), fr.y(idn.nose_y)])
    w = idn.nose_half_w
    top = np.array([fr.x(idn.face_cx - 2.5, 4.0), fr.y(idn.eye_y + 4.0)])
    bridge = _bezier(top, (top + tip) * 0.5 + np.array([-1.0, 0.0]), tip + np.array([-0.5 * w, -3]))
    cv2.polylines(img, [_fx(bridge)], False, _c(idn.skin * 0.82), 1, _AA, _SHIFT)
    _ellipse(img, tip, (0.5 * w, 2.6), 0.0, idn.skin * 0.78, 1, 0.0, 180.0)
    for side in (-1.0, 1.0):
        _ellipse(img, tip + np.array([side * 0.55 * w, 1.6]), (0.3 * w, 1.3), 0.0, idn.skin * 0.5)
    _ellipse(img, tip + np.array([0.0, -1.2]), (0.35 * w, 1.3), 0.0, idn.skin * 1.07)
    return tip


def _draw_mouth(img, idn: FaceIdentity, shot: Shot, fr: _Frame) -> tuple[np.ndarray, np.ndarray]:
    mx, my = fr.x(idn.face_cx, 3.5), fr.y(idn.mouth_y)
    w = idn.mouth_half_w * (1.0 + 0.015 * shot.smile) * (1.0 - 0.1 * abs(fr.yaw))
    left = np.array([mx - w, my - 0.6 * shot.smile])
    right = np.array([mx + w, my - 0.6 * shot.smile])
    line_y = my + 0.35 * shot.smile
    gap = 0.5 * shot.mouth_open
    if idn.moustache:
        upper = _bezier(left, (mx, line_y - idn.lip_upper - gap), right)
        band = np.concatenate([upper - [0, 1.0], (upper - [0, 4.5])[::-1]])
        band[:, 0] = mx + (band[:, 0] - mx) * 1.12
        _poly(img, band, idn.hair * 0.9)
    outer_up = _bezier(left, (mx, line_y - idn.lip_upper - gap), right)
    outer_lo = _bezier(right, (mx, line_y + idn.lip_lower + gap), left)
    _poly(img, np.concatenate([outer_up, outer_lo]), idn.lips)
    if shot.mouth_open > 0.8:
        inner_up = _bezier(left, (mx, line_y - gap), right)
        inner_lo = _bezier(right, (mx, line_y + gap), left)
        _poly(img, np.concatenate([inner_up, inner_lo]), (55.0, 22.0, 28.0))
        teeth = inner_up[1:-1]
        depth = min(0.45 * shot.mouth_open, 2.5)
        _poly(img, np.concatenate([teeth, (teeth + [0, depth])[::-1]]), (232.0, 228.0, 218.0))
    else:
        line = _bezier(left, (mx, line_y), right)
        cv2.polylines(img, [_fx(line)], False, _c(idn.lips * 0.55), 1, _AA, _SHIFT)
    return left, right


def _draw_beard(img, idn: FaceIdentity, fr: _Frame, outline) -> None:
    lower = outline[: len(outline) // 2 + 1]  # right cheek → chin → left cheek
    lower = lower[lower[:, 1] > fr.y(idn.mouth_y - 12.0)]
    if len(lower) < 3:
        return
    overlay = img.copy()
    _poly(overlay, lower, idn.hair)
    cv2.addWeighted(overlay, 0.7, img, 0.3, 0.0, dst=img)


def _draw_glasses(img, idn: FaceIdentity, eyes: list[np.ndarray]) -> None:
    colour = _c(idn.frame)
    r = idn.eye_half_w * 1.5
    for centre in eyes:
        if idn.glasses_round:
            _ellipse(img, centre, (r, r * 0.85), 0.0, colour, 1)
        else:
            box = centre + np.array([[-r, -0.7 * r], [r, -0.7 * r], [r, 0.7 * r], [-r, 0.7 * r]])
            cv2.polylines(img, [_fx(box)], True, colour, 1, _AA, _SHIFT)
    bridge = np.array([eyes[0] + [r, -1.0], eyes[1] - [r, 1.0]])
    cv2.polylines(img, [_fx(bridge)], False, colour, 1, _AA, _SHIFT)


def _apply_skin_field(img, idn: FaceIdentity, fr: _Frame, outline, margin: int) -> None:
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.fillPoly(mask, [_fx(outline)], 255, _AA, _SHIFT)
    start = margin - FIELD_MARGIN
    sl = (slice(start, start + FIELD_SIZE), slice(start, start + FIELD_SIZE))
    shift = int(round(fr.yaw * 2.0))
    field = np.roll(idn.skin_field, shift, axis=1) if shift else idn.skin_field
    weight = mask[sl].astype(np.float32) * (1.0 / 255.0)
    factor = 1.0 + (field - 1.0) * weight
    img[sl] = np.clip(img[sl].astype(np.float32) * factor[..., None], 0.0, 255.0).astype(np.uint8)


def draw_face(
    canvas: np.ndarray, idn: FaceIdentity, shot: Shot, scene: Scene, *, margin: int
) -> np.ndarray:
    """Draws an upright face onto ``canvas`` in place.

    Args:
        canvas: (112 + 2·margin, 112 + 2·margin, 3) uint8 RGB, already holding the backdrop.
        idn: the identity.
        shot: pose (only yaw is used here), expression and hair jitter.
        scene: clothes colour.
        margin: pixels between the canvas edge and the template frame.

    Returns:
        (5, 2) float64 landmarks in canvas pixels: eyes, nose tip, mouth corners.
    """
    fr = _Frame(float(margin), idn.face_cx, idn.face_cy, shot.yaw)
    size = canvas.shape[0]
    outline = _outline(idn, fr)
    neck_w = 0.5 * idn.face_half_w
    shoulder_c = (fr.x(idn.face_cx), fr.y(idn.face_cy + idn.face_half_h + 40.0))
    if idn.hair_style == "long":
        _draw_hair(canvas, idn, shot, fr, outline, back=True)
    neck = np.array(
        [
            [fr.x(idn.face_cx - neck_w), fr.y(idn.face_cy)],
            [fr.x(idn.face_cx + neck_w), fr.y(idn.face_cy)],
            [fr.x(idn.face_cx + neck_w), size],
            [fr.x(idn.face_cx - neck_w), size],
        ]
    )
    _poly(canvas, neck, idn.skin * 0.8)
    _ellipse(canvas, shoulder_c, (2.3 * idn.face_half_w, 46.0), 0.0, scene.clothes)
    for side in (-1.0, 1.0):
        ear = (fr.x(idn.face_cx + side * idn.face_half_w * 0.97, -4.0), fr.y(idn.eye_y + 9.0))
        _ellipse(canvas, ear, (4.5, idn.ear_half_h), 0.0, idn.skin * 0.9)
    _poly(canvas, outline, idn.skin)
    _apply_skin_field(canvas, idn, fr, outline, margin)
    for x, y, r in idn.moles:
        shade = 0.5 if r > 0.7 else 0.78  # moles darker than freckles
        _ellipse(canvas, (fr.x(x, 2.0), fr.y(y)), (r, r), 0.0, idn.skin * shade)
    if idn.beard:
        _draw_beard(canvas, idn, fr, outline)
    if idn.hair_style != "bald":
        _draw_hair(canvas, idn, shot, fr, outline, back=False)
    eyes = [_draw_eye(canvas, idn, shot, fr, side) for side in (-1, 1)]
    for side in (-1, 1):
        _draw_brow(canvas, idn, shot, fr, side)
    nose = _draw_nose(canvas, idn, fr)
    mouth_l, mouth_r = _draw_mouth(canvas, idn, shot, fr)
    if idn.glasses:
        _draw_glasses(canvas, idn, eyes)
    return np.stack([eyes[0], eyes[1], nose, mouth_l, mouth_r])
