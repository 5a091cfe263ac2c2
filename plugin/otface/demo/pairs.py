"""The demo's LFW-format verification sets: ``demo_lfw.bin`` and the harder ``demo_hard.bin``.

Both hold pairs in LFW's layout (half genuine, alternating genuine / impostor, so each of the 10
contiguous folds has both kinds), drawn from a pool of distinct photos per identity; pairs share
photos, so a set of 6,000 pairs is rendered from about a fifth as many images.

``demo_hard`` is in the spirit of CFP-FP and CPLFW: every pair puts a *reference* photo
(near-frontal, unoccluded, even light) against a *hard* one of the same or another identity:
a near-profile pose, an occluder, or harsh lighting, in equal shares.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from otface.demo.identity import FaceIdentity, Scene, Shot
from otface.demo.photos import Condition, Stream, encode_jpeg, photo, rng_for

__all__ = ["HARD_KINDS", "pair_capacity", "write_lfw_set", "write_hard_set"]

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


def write_hard_set(
    path: Path, seed: int, first_id: int, idns: list[FaceIdentity], per_id: int, n_pairs: int
) -> None:
    """Reference-against-hard pairs: photos ``0 … per_id/2 - 1`` of each identity are
    references, the rest hard (:data:`HARD_KINDS` in turn, shifted by identity)."""
    n_ref = per_id // 2
    pool = []
    for i, idn in enumerate(idns):
        photos = []
        for j in range(per_id):
            kind = HARD_KINDS[(j - n_ref + i) % len(HARD_KINDS)]
            condition = _reference if j < n_ref else _HARD[kind]
            photos.append(
                encode_jpeg(photo(seed, Stream.HARD, idn, first_id + i, j, condition=condition))
            )
        pool.append(photos)
    refs, hards = np.arange(n_ref), np.arange(n_ref, per_id)
    combos = np.array([(a, b) for a in refs for b in hards])
    rows = _choose_pairs(rng_for(seed, Stream.HARD_PAIRS), len(idns), combos, refs, hards, n_pairs)
    _dump(path, pool, rows)
