"""The demo's LFW-format verification sets: ``demo_lfw.bin``, the harder ``demo_hard.bin`` and
the partial-face sets ``demo_mask.bin`` and ``demo_crop.bin``.

Both hold pairs in LFW's layout (half genuine, alternating genuine / impostor, so each of the 10
contiguous folds has both kinds), drawn from a pool of distinct photos per identity; pairs share
photos, so a set of 6,000 pairs is rendered from about a fifth as many images.

``demo_hard`` is in the spirit of CFP-FP and CPLFW: every pair puts a *reference* photo
(near-frontal, unoccluded, even light) against a *hard* one of the same or another identity:
a near-profile pose, an occluder, or harsh lighting, in equal shares. Its sidecar
``demo_hard.conditions.txt`` names each pair's condition, so the evaluator can report each.

``demo_mask`` and ``demo_crop`` keep that reference side and change the other: a mask over nose
and mouth (the protocol of ICCV21-MFR's mask track), or a partial face (about 70% of the image
area, the rest cut away, rescaled to 112×112).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np

from otface.demo.identity import FaceIdentity, Scene, Shot
from otface.demo.photos import Condition, Stream, encode_jpeg, photo, rng_for
from otface.demo.render import RenderedFace

__all__ = [
    "HARD_KINDS",
    "CROP_REGIONS",
    "pair_capacity",
    "write_lfw_set",
    "write_hard_set",
    "write_mask_set",
    "write_crop_set",
    "crop_partial",
]

#: Conditions of the hard photos, in the order they cycle through an identity's photos.
HARD_KINDS = ("pose", "occlusion", "light")


def _reference(shot: Shot, scene: Scene, rng: np.random.Generator) -> tuple[Shot, Scene]:
    shot = shot._replace(
        yaw=float(np.clip(rng.normal(0.0, 0.12), -0.25, 0.25)),
        occlusion="",
        blur_sigma=min(shot.blur_sigma, 0.8),
    )
    return shot, scene._replace(light_strength=min(scene.light_strength, 0.2))


def _pose(shot: Shot, scene: Scene, rng: np.random.Generator) -> tuple[Shot, Scene]:
    yaw = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.75, 1.0))
    return shot._replace(yaw=yaw, roll_deg=float(rng.uniform(-12.0, 12.0))), scene


def _occlusion(shot: Shot, scene: Scene, rng: np.random.Generator) -> tuple[Shot, Scene]:
    kind = str(rng.choice(["bar", "patch", "mask", "hand"]))
    return shot._replace(occlusion=kind, occlusion_params=rng.random(6)), scene


def _light(shot: Shot, scene: Scene, rng: np.random.Generator) -> tuple[Shot, Scene]:
    dark = rng.random() < 0.5
    shot = shot._replace(
        brightness=float(rng.uniform(0.45, 0.6) if dark else rng.uniform(1.3, 1.5)),
        gamma=float(rng.uniform(1.3, 1.6) if dark else rng.uniform(0.6, 0.75)),
    )
    return shot, scene._replace(light_strength=float(rng.uniform(0.55, 0.7)))


_HARD: dict[str, Condition] = {"pose": _pose, "occlusion": _occlusion, "light": _light}


def _mask(shot: Shot, scene: Scene, rng: np.random.Generator) -> tuple[Shot, Scene]:
    """A mask over nose and mouth; pose and light as drawn, never harsher than a reference's
    light, so the mask is the condition under test."""
    shot = shot._replace(
        yaw=float(np.clip(shot.yaw, -0.5, 0.5)), occlusion="mask", occlusion_params=rng.random(6)
    )
    return shot, scene._replace(light_strength=min(scene.light_strength, 0.35))


def _unoccluded(shot: Shot, scene: Scene, rng: np.random.Generator) -> tuple[Shot, Scene]:
    shot = shot._replace(yaw=float(np.clip(shot.yaw, -0.5, 0.5)), occlusion="")
    return shot, scene._replace(light_strength=min(scene.light_strength, 0.35))


#: Which part of the face a partial face keeps, with the fraction of each side kept: about 70%
#: of the area each (upper, lower, left, right part, or a centred window).
CROP_REGIONS = {
    "upper": (0.70, 1.0),
    "lower": (0.70, 1.0),
    "left": (1.0, 0.70),
    "right": (1.0, 0.70),
    "centre": (0.837, 0.837),
}


def crop_partial(image: np.ndarray, region: str, jitter: np.ndarray) -> np.ndarray:
    """Cuts the part of ``image`` that ``region`` names and rescales it to the image's size.

    Args:
        image: ``(H, W, 3)`` aligned face.
        region: a key of :data:`CROP_REGIONS`.
        jitter: two uniforms in [0, 1] that move the centred window by up to ±5% of the side.
    """
    h, w = image.shape[:2]
    keep_h, keep_w = CROP_REGIONS[region]
    ch, cw = int(round(h * keep_h)), int(round(w * keep_w))
    slack_y, slack_x = h - ch, w - cw
    top = {"upper": 0, "lower": slack_y}.get(region, slack_y // 2)
    left = {"left": 0, "right": slack_x}.get(region, slack_x // 2)
    if region == "centre":
        top += int(round((jitter[0] - 0.5) * 0.1 * h))
        left += int(round((jitter[1] - 0.5) * 0.1 * w))
        top, left = int(np.clip(top, 0, slack_y)), int(np.clip(left, 0, slack_x))
    part = image[top : top + ch, left : left + cw]
    return cv2.resize(part, (w, h), interpolation=cv2.INTER_LINEAR)


def pair_capacity(n_identities: int, genuine_per_identity: int, side_a: int, side_b: int):
    """Distinct ``(genuine, impostor)`` pairs a pool offers: genuine combinations per identity
    times identities; impostor photo pairs across ordered identity pairs."""
    impostor = n_identities * (n_identities - 1) * side_a * side_b
    return n_identities * genuine_per_identity, impostor


def _choose_pairs(rng, n_id: int, combos: np.ndarray, side_a, side_b, n_pairs: int) -> list:
    """``(i, a, j, b, same)`` rows: ``n_pairs // 2`` genuine pairs ``(i, a, i, b)`` with
    ``(a, b)`` from ``combos``, spread evenly over identities, and distinct impostor pairs with
    ``a`` from ``side_a`` and ``b`` from ``side_b``; alternating genuine / impostor."""
    n_pos = n_pairs // 2
    queues = [rng.permutation(combos) for _ in range(n_id)]
    order = rng.permutation(n_id)
    genuine = []
    for k in range(n_pos):
        i = int(order[k % n_id])
        a, b = queues[i][k // n_id]
        genuine.append((i, int(a), i, int(b), True))
    impostor: set[tuple[int, int, int, int]] = set()
    while len(impostor) < n_pairs - n_pos:
        i, j = rng.choice(n_id, size=2, replace=False)
        a = side_a[int(rng.integers(len(side_a)))]
        b = side_b[int(rng.integers(len(side_b)))]
        impostor.add((int(i), int(a), int(j), int(b)))
    ordered = sorted(impostor)
    impostors = [(*ordered[k], False) for k in rng.permutation(len(ordered))]
    rows = []
    for k in range(max(len(genuine), len(impostors))):
        rows += genuine[k : k + 1] + impostors[k : k + 1]
    return rows


def _dump(path: Path, pool: list[list[bytes]], rows: list) -> None:
    # Repeated photos are the same bytes object, which pickle stores once.
    bins: list[bytes] = []
    issame: list[bool] = []
    for i, a, j, b, same in rows:
        bins += [pool[i][a], pool[j][b]]
        issame.append(bool(same))
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)


def write_lfw_set(
    path: Path, seed: int, first_id: int, idns: list[FaceIdentity], per_id: int, n_pairs: int
) -> None:
    """LFW-like pairs: any two photos of one identity, any photos of two identities."""
    pool = [
        [encode_jpeg(photo(seed, Stream.VAL, idn, first_id + i, j)) for j in range(per_id)]
        for i, idn in enumerate(idns)
    ]
    combos = np.array([(a, b) for a in range(per_id) for b in range(a + 1, per_id)])
    every = np.arange(per_id)
    rows = _choose_pairs(rng_for(seed, Stream.VAL_PAIRS), len(idns), combos, every, every, n_pairs)
    _dump(path, pool, rows)


def _reference_pool(idns, per_id, kind_of, make):
    """Photos ``0 … per_id/2 - 1`` of each identity are references, the rest ``make(kind)``
    rendered photos; returns the JPEG pool and each photo's kind."""
    n_ref = per_id // 2
    pool, kinds = [], []
    for i, idn in enumerate(idns):
        photos, names = [], []
        for j in range(per_id):
            kind = "reference" if j < n_ref else kind_of(i, j)
            photos.append(encode_jpeg(make(kind, i, j, idn)))
            names.append(kind)
        pool.append(photos)
        kinds.append(names)
    return pool, kinds


def _reference_rows(seed, pair_stream, n_id, per_id, n_pairs):
    n_ref = per_id // 2
    refs, hards = np.arange(n_ref), np.arange(n_ref, per_id)
    combos = np.array([(a, b) for a in refs for b in hards])
    return _choose_pairs(rng_for(seed, pair_stream), n_id, combos, refs, hards, n_pairs)


def _write_conditions(path: Path, kinds: list, rows: list) -> None:
    """One line per pair: the condition of its non-reference photo."""
    path.write_text("".join(f"{kinds[j][b]}\n" for _i, _a, j, b, _same in rows))


def write_hard_set(
    path: Path, seed: int, first_id: int, idns: list[FaceIdentity], per_id: int, n_pairs: int
) -> None:
    """Reference-against-hard pairs: photos ``0 … per_id/2 - 1`` of each identity are
    references, the rest hard (:data:`HARD_KINDS` in turn, shifted by identity). Writes
    ``path`` and its sidecar ``<stem>.conditions.txt``."""
    n_ref = per_id // 2

    def make(kind, i, j, idn):
        condition = _reference if kind == "reference" else _HARD[kind]
        return photo(seed, Stream.HARD, idn, first_id + i, j, condition=condition)

    pool, kinds = _reference_pool(
        idns, per_id, lambda i, j: HARD_KINDS[(j - n_ref + i) % len(HARD_KINDS)], make
    )
    rows = _reference_rows(seed, Stream.HARD_PAIRS, len(idns), per_id, n_pairs)
    _dump(path, pool, rows)
    _write_conditions(path.with_name(f"{path.stem}.conditions.txt"), kinds, rows)


def write_mask_set(
    path: Path, seed: int, first_id: int, idns: list[FaceIdentity], per_id: int, n_pairs: int
) -> None:
    """Unoccluded reference against a masked face (nose and mouth covered), as ICCV21-MFR's
    mask track pairs them: references as in ``demo_hard``, the other photos masked."""

    def make(kind, i, j, idn):
        condition = _reference if kind == "reference" else _mask
        return photo(seed, Stream.MASK, idn, first_id + i, j, condition=condition)

    pool, _ = _reference_pool(idns, per_id, lambda i, j: "mask", make)
    _dump(path, pool, _reference_rows(seed, Stream.MASK_PAIRS, len(idns), per_id, n_pairs))


def write_crop_set(
    path: Path, seed: int, first_id: int, idns: list[FaceIdentity], per_id: int, n_pairs: int
) -> None:
    """Unoccluded reference against a partial face: about 70% of an unoccluded photo (the
    :data:`CROP_REGIONS` in turn, shifted by identity) rescaled to 112×112. Writes ``path`` and
    its sidecar ``<stem>.conditions.txt`` (the region kept)."""
    regions = tuple(CROP_REGIONS)
    n_ref = per_id // 2

    def make(kind, i, j, idn) -> RenderedFace:
        if kind == "reference":
            return photo(seed, Stream.CROP, idn, first_id + i, j, condition=_reference)
        face = photo(seed, Stream.CROP, idn, first_id + i, j, condition=_unoccluded)
        jitter = rng_for(seed, Stream.CROP_WINDOW, first_id + i, j).random(2)
        return face._replace(image=crop_partial(face.image, kind, jitter))

    pool, kinds = _reference_pool(
        idns, per_id, lambda i, j: regions[(j - n_ref + i) % len(regions)], make
    )
    rows = _reference_rows(seed, Stream.CROP_PAIRS, len(idns), per_id, n_pairs)
    _dump(path, pool, rows)
    _write_conditions(path.with_name(f"{path.stem}.conditions.txt"), kinds, rows)
