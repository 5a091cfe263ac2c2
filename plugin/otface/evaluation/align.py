"""Five-point face alignment to the ArcFace 112×112 template, as InsightFace's ``norm_crop``.

The warp is the least-squares similarity transform (rotation, uniform scale, translation) that
maps the five detected landmarks onto the template (Umeyama, TPAMI 1991), fitted by
scikit-image's ``SimilarityTransform`` in the landmarks' float32 exactly as InsightFace's
alignment fits it, and applied with OpenCV's bilinear ``warpAffine`` and a black border. So the
crops, and the IJB figures, equal InsightFace's to the pixel without importing insightface,
whose dependencies (onnxruntime, opencv-python) would clash with onnxruntime-gpu and
opencv-python-headless. ``tests/test_align.py`` compares the two pixel for pixel.
"""

from __future__ import annotations

import cv2
import numpy as np

from otface.landmarks import ARCFACE_TEMPLATE_112

__all__ = ["ARCFACE_TEMPLATE_112", "align_face", "similarity_transform"]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity ``x ↦ s·R·x + t`` taking points ``src`` onto ``dst``.

    Args:
        src: ``(n, 2)`` source points; the fit runs in their dtype, as scikit-image's does.
        dst: ``(n, 2)`` target points.

    Returns:
        ``(2, 3)`` float64 matrix ``[s·R | t]``.

    Raises:
        ValueError: shapes other than two ``(n, 2)``, or points with no unique fit (all
        coincident).
    """
    from skimage.transform import SimilarityTransform

    src, dst = np.asarray(src), np.asarray(dst)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape:
        raise ValueError(
            f"similarity_transform: src and dst must both be (n, 2), got {src.shape} and "
            f"{dst.shape}"
        )
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        fitted = SimilarityTransform.from_estimate(src, dst)
        ok = bool(fitted)
    else:
        fitted = SimilarityTransform()
        ok = fitted.estimate(src, dst)
    matrix = np.asarray(fitted.params, dtype=np.float64)[:2] if ok else None
    if matrix is None or not np.isfinite(matrix).all():
        raise ValueError(f"similarity_transform: no similarity fits the points {src.tolist()}")
    return matrix


def align_face(image_bgr: np.ndarray, landmarks: np.ndarray, *, image_size: int = 112):
    """Warps a face to ``image_size``² so that its five landmarks ``(5, 2)`` land on the ArcFace
    template (scaled for 112·k; for 128·k, scaled and shifted right by 8·k as InsightFace does).

    Returns:
        ``(image_size, image_size, 3)`` uint8, same channel order as the input.
    """
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.shape != (5, 2):
        raise ValueError(f"align_face: landmarks must be (5, 2), got {landmarks.shape}")
    if image_size % 112 == 0:
        template = ARCFACE_TEMPLATE_112 * (image_size / 112.0)
    elif image_size % 128 == 0:
        template = ARCFACE_TEMPLATE_112 * (image_size / 128.0)
        template[:, 0] += 8.0 * image_size / 128.0
    else:
        raise ValueError(
            f"align_face: image_size must be a multiple of 112 or 128, got {image_size}"
        )
    matrix = similarity_transform(landmarks, template)
    return cv2.warpAffine(image_bgr, matrix, (image_size, image_size), borderValue=0.0)
