"""Five-point alignment: our similarity fit and warp against closed-form cases and, pixel for
pixel, against insightface's ``norm_crop`` (the alignment InsightFace's IJB scripts use), on
noise images where any difference in the fitted matrix would show."""

import numpy as np
import pytest

from otface.evaluation.align import ARCFACE_TEMPLATE_112, align_face, similarity_transform


def _similarity(angle_rad, scale, shift):
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    return np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])


def test_an_exact_similarity_is_recovered():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 200, (5, 2))
    truth = _similarity(0.7, 0.55, (-12.0, 31.0))
    dst = src @ truth[:, :2].T + truth[:, 2]
    np.testing.assert_allclose(similarity_transform(src, dst), truth, atol=1e-10)


def test_a_mirrored_point_set_gets_a_rotation_not_a_reflection():
    src = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    dst = src * np.array([-1.0, 1.0])
    m = similarity_transform(src, dst)
    assert np.linalg.det(m[:, :2]) > 0

    # The best proper fit of a mirror image beats the identity and every other rotation tried.
    def residual(matrix):
        return np.square(src @ matrix[:, :2].T + matrix[:, 2] - dst).sum()

    for angle in np.linspace(0, 2 * np.pi, 73):
        for scale in (0.2, 0.5, 1.0):
            trial = _similarity(angle, scale, (0.0, 0.0))
            trial[:, 2] = dst.mean(0) - trial[:, :2] @ src.mean(0)
            assert residual(m) <= residual(trial) + 1e-9


def test_collinear_and_coincident_points():
    src = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    truth = _similarity(-0.4, 2.0, (5.0, 6.0))
    m = similarity_transform(src, src @ truth[:, :2].T + truth[:, 2])
    np.testing.assert_allclose(m, truth, atol=1e-10)
    with pytest.raises(ValueError, match="no similarity fits"):
        similarity_transform(np.ones((5, 2)), src)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        similarity_transform(src[:, :1], src)


def test_template_landmarks_align_to_themselves():
    m = similarity_transform(ARCFACE_TEMPLATE_112, ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-5)  # a float32 fit
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        align_face(np.zeros((200, 200, 3), np.uint8), ARCFACE_TEMPLATE_112, image_size=100)
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        align_face(np.zeros((200, 200, 3), np.uint8), ARCFACE_TEMPLATE_112[:4])


@pytest.mark.parametrize("image_size", [112, 224, 128])
@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")
def test_equals_insightface_norm_crop_pixel_for_pixel(image_size):
    face_align = pytest.importorskip("insightface.utils.face_align")
    rng = np.random.default_rng(image_size)
    image = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    for _ in range(40):
        # Landmarks of a face at a random place, size and roll, each point jittered.
        truth = _similarity(rng.uniform(-0.6, 0.6), rng.uniform(0.8, 2.2), rng.uniform(0, 80, 2))
        landmarks = ARCFACE_TEMPLATE_112 @ truth[:, :2].T + truth[:, 2]
        landmarks = (landmarks + rng.normal(0, 3, landmarks.shape)).astype(np.float32)
        ours = align_face(image, landmarks, image_size=image_size)
        theirs = face_align.norm_crop(image, landmark=landmarks, image_size=image_size)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert np.array_equal(ours, theirs)
