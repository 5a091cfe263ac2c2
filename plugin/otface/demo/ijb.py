"""The demo's IJB-format benchmark (InsightFace's release layout, target name ``demo``).

Each identity's loose crops are split into templates of 1–4 images from 1–2 medias (photos of
one sitting share a scene). 1:1: every genuine template pair is listed; impostor pairs are a
random subset of all cross-identity template pairs, enough that TAR at FAR 1e-4 rests on ≥ 10
impostors by default. 1:N (:func:`split_1n`): two disjoint galleries of one template per
enrolled identity, and mixed probes made of the other templates of enrolled identities and of
every template of the identities left out (non-mated probes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from otface.demo.identity import FaceIdentity, Shot, sample_scene, sample_shot
from otface.demo.photos import Stream, encode_jpeg, rng_for
from otface.demo.render import render_face

__all__ = ["LOOSE_SIZE", "PROBE_OCCLUDERS", "split_1n", "template_sizes", "write_ijb_set"]

#: Side of the unaligned loose crops (pixels).
LOOSE_SIZE = 176


def _faceness(shot: Shot, rng: np.random.Generator) -> float:
    score = rng.uniform(0.85, 1.0) - 0.1 * shot.blur_sigma / 1.6
    if shot.occlusion:
        score *= rng.uniform(0.45, 0.7)
    return float(np.clip(score, 0.3, 1.0))


def template_sizes(rng: np.random.Generator, n_images: int) -> list[int]:
    """Splits an identity's images into templates of 1–4 images, at least two templates."""
    sizes: list[int] = []
    left = n_images
    while left:
        cap = min(4, left if sizes else left - 1)
        sizes.append(int(rng.integers(1, cap + 1)))
        left -= sizes[-1]
    return sizes


def _impostor_pairs(owner: np.ndarray, n_impostor: int, rng: np.random.Generator) -> np.ndarray:
    """``(K, 2)`` template pairs ``a < b`` of different identities (1-based template ids): all of
    them when ``n_impostor`` reaches their number, else a random subset, sorted."""
    a, b = np.triu_indices(len(owner), k=1)
    cross = owner[a] != owner[b]
    pairs = np.stack([a[cross], b[cross]], axis=1) + 1
    if n_impostor < len(pairs):
        pairs = pairs[np.sort(rng.choice(len(pairs), n_impostor, replace=False))]
    return pairs


def split_1n(owner: list[int], rng: np.random.Generator) -> tuple[list[int], list[int], list[int]]:
    """Splits 1-based templates into gallery 1, gallery 2 and probes for 1:N.

    Identities are shuffled: a fifth of them (at least one once there are three) are not
    enrolled; the rest are split evenly between the galleries, each enrolled with one of its
    templates drawn at random. All other templates are probes.
    """
    by_id: dict[int, list[int]] = {}
    for t, i in enumerate(owner, start=1):
        by_id.setdefault(i, []).append(t)
    ids = [int(i) for i in rng.permutation(sorted(by_id))]
    n_out = max(1, len(ids) // 5) if len(ids) >= 3 else 0
    enrolled = ids[: len(ids) - n_out]
    half = (len(enrolled) + 1) // 2
    galleries: tuple[list[int], list[int]] = ([], [])
    for k, i in enumerate(enrolled):
        galleries[k >= half].append(int(rng.choice(by_id[i])))
    chosen = set(galleries[0]) | set(galleries[1])
    probes = [t for t in range(1, len(owner) + 1) if t not in chosen]
    return sorted(galleries[0]), sorted(galleries[1]), probes


def _write_1n_lists(
    meta: Path, prefix: str, owner: list[int], images: dict[int, list[str]], split
) -> None:
    for name, templates in zip(("gallery_G1", "gallery_G2", "probe_mixed"), split):
        rows = ["TEMPLATE_ID,SUBJECT_ID,FILENAME\n"]
        rows += [f"{t},{owner[t - 1] + 1},{img}\n" for t in templates for img in images[t]]
        (meta / f"{prefix}_1N_{name}.csv").write_text("".join(rows))


#: The occluders of the ``demo_occluded`` probes, one drawn per probe template.
PROBE_OCCLUDERS = ("mask", "bar", "patch", "hand")


def _write_occluded_target(
    root: Path,
    seed: int,
    first_id: int,
    idns: list[FaceIdentity],
    owner: list[int],
    faces: list,
    pairs: list,
    split: tuple,
) -> None:
    """Target ``demo_occluded``: the ``demo`` target's galleries (the same images) against its
    probe templates photographed again with an occluder over the face.

    Each probe image is re-rendered from the same draw as its ``demo`` original (identity, pose
    within ±0.5 yaw, expression, light, scene), with one occluder per template from
    :data:`PROBE_OCCLUDERS` covering every image of the template. Template and media ids are
    those of ``demo``; the occluded images are ``occ_<n>.jpg``. 1:1 lists the ``demo`` pairs of
    one gallery and one probe template, in ``demo``'s order; 1:N has ``demo``'s galleries and the
    occluded probes. ``demo_occluded_probe_occluders.txt`` names each probe template's occluder.
    """
    meta, crops = root / "meta", root / "loose_crop"
    g1, g2, probes = split
    gallery, probe_set = set(g1) | set(g2), set(probes)
    tid_mid, lmk_lines, occluders = [], [], []
    images: dict[int, list[str]] = {}
    kind_of = {}
    for t in probes:
        occ = rng_for(seed, Stream.IJB_OCCLUDED, t)
        kind_of[t] = (PROBE_OCCLUDERS[int(occ.integers(len(PROBE_OCCLUDERS)))], occ)
        occluders.append(f"{t} {kind_of[t][0]}\n")
    for face in faces:
        name, template, media, i, image_no, scene, line = face
        if template in gallery:
            tid_mid.append(f"{name} {template} {media}\n")
            lmk_lines.append(line)
            images.setdefault(template, []).append(name)
            continue
        kind, occ = kind_of[template]
        rng = rng_for(seed, Stream.IJB_IMAGE, first_id + i, image_no)
        shot = sample_shot(rng)
        shot = shot._replace(
            yaw=float(np.clip(shot.yaw, -0.5, 0.5)),
            occlusion=kind,
            occlusion_params=occ.random(6),
        )
        rendered = render_face(idns[i], shot, scene, rng, loose_size=LOOSE_SIZE)
        occ_name = f"occ_{image_no}.jpg"
        (crops / occ_name).write_bytes(encode_jpeg(rendered))
        tid_mid.append(f"{occ_name} {template} {media}\n")
        coords = " ".join(f"{v:.3f}" for v in rendered.landmarks.reshape(-1))
        lmk_lines.append(f"{occ_name} {coords} {_faceness(shot, rng):.3f}\n")
        images.setdefault(template, []).append(occ_name)
    kept = [
        (a, b, y)
        for a, b, y in pairs
        if (a in gallery and b in probe_set) or (b in gallery and a in probe_set)
    ]
    prefix = "demo_occluded"
    (meta / f"{prefix}_face_tid_mid.txt").write_text("".join(tid_mid))
    (meta / f"{prefix}_name_5pts_score.txt").write_text("".join(lmk_lines))
    (meta / f"{prefix}_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {y}\n" for a, b, y in kept)
    )
    (meta / f"{prefix}_probe_occluders.txt").write_text("".join(occluders))
    _write_1n_lists(meta, prefix, owner, images, split)


def write_ijb_set(
    root: Path,
    seed: int,
    first_id: int,
    idns: list[FaceIdentity],
    per_id: int,
    n_impostor: int,
) -> int:
    """Writes ``root/meta/demo_*.txt``, the 1:N lists ``root/meta/demo_1N_*.csv`` and
    ``root/loose_crop/*.jpg``, and the occluded-probe target ``demo_occluded`` beside them
    (:func:`_write_occluded_target`); returns the number of impostor pairs listed
    (``n_impostor``, or all cross-identity pairs when fewer exist)."""
    meta, crops = root / "meta", root / "loose_crop"
    meta.mkdir(parents=True)
    crops.mkdir()
    layout = rng_for(seed, Stream.IJB_LAYOUT)
    tid_mid, lmk_lines, owner, faces = [], [], [], []
    images: dict[int, list[str]] = {}
    image_no, template, media = 0, 0, 0
    for i, idn in enumerate(idns):
        for size in template_sizes(layout, per_id):
            template += 1
            owner.append(i)
            split = int(layout.integers(1, size)) if size > 1 and layout.random() < 0.5 else size
            for k in range(size):
                if k in (0, split):
                    media += 1
                    scene = sample_scene(rng_for(seed, Stream.IJB_MEDIA, media))
                image_no += 1
                rng = rng_for(seed, Stream.IJB_IMAGE, first_id + i, image_no)
                shot = sample_shot(rng)
                face = render_face(idn, shot, scene, rng, loose_size=LOOSE_SIZE)
                name = f"{image_no}.jpg"
                (crops / name).write_bytes(encode_jpeg(face))
                tid_mid.append(f"{name} {template} {media}\n")
                images.setdefault(template, []).append(name)
                coords = " ".join(f"{v:.3f}" for v in face.landmarks.reshape(-1))
                lmk_lines.append(f"{name} {coords} {_faceness(shot, rng):.3f}\n")
                faces.append((name, template, media, i, image_no, scene, lmk_lines[-1]))
    owner_arr = np.asarray(owner)
    by_id: dict[int, list[int]] = {}
    for t, i in enumerate(owner, start=1):
        by_id.setdefault(i, []).append(t)
    pairs = [(a, b, 1) for ts in by_id.values() for x, a in enumerate(ts) for b in ts[x + 1 :]]
    impostor = _impostor_pairs(owner_arr, n_impostor, layout)
    pairs += [(int(a), int(b), 0) for a, b in impostor]
    pairs = [pairs[k] for k in layout.permutation(len(pairs))]
    (meta / "demo_face_tid_mid.txt").write_text("".join(tid_mid))
    (meta / "demo_name_5pts_score.txt").write_text("".join(lmk_lines))
    (meta / "demo_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {y}\n" for a, b, y in pairs)
    )
    split = split_1n(owner, rng_for(seed, Stream.IJB_1N))
    _write_1n_lists(meta, "demo", owner, images, split)
    _write_occluded_target(root, seed, first_id, idns, owner, faces, pairs, split)
    return len(impostor)
