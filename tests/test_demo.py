"""Tests of the embedded demo data generator (otface.demo and its render helpers)."""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from _jobs import TINY_DEMO as TINY

import otface.demo.generate as demo
from otface.data.recordio import IndexedRecordReader, unpack_payload
from otface.demo.identity import sample_identity, sample_scene, sample_shot
from otface.demo.render import render_face

# The ArcFace 112×112 reference landmarks, as published with InsightFace's alignment code.
TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
     [70.7299, 92.2041]]
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return demo.generate_demo(tmp_path_factory.mktemp("demo") / "d", seed=3, **TINY)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _decode(buf: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def _photo(i: int, *, loose_size=None, seed: int = 0):
    idn = sample_identity(np.random.default_rng([seed, 0, i]))
    rng = np.random.default_rng([seed, 1, i])
    return render_face(idn, sample_shot(rng), sample_scene(rng), rng, loose_size=loose_size)


# --- rendering ------------------------------------------------------------------------------


def test_render_is_deterministic_and_seed_dependent():
    a, b, c = _photo(7), _photo(7), _photo(7, seed=1)
    assert a.image.dtype == np.uint8 and a.image.shape == (112, 112, 3)
    assert a.landmarks.dtype == np.float32 and a.landmarks.shape == (5, 2)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 5
    assert not np.allclose(a.landmarks, c.landmarks)


def test_aligned_landmarks_near_template_with_pose_jitter():
    lmk = np.stack([_photo(i).landmarks for i in range(60)])
    err = np.hypot(*(lmk - TEMPLATE).transpose(2, 0, 1))  # (60, 5) pixels
    assert (lmk >= 0).all() and (lmk < 112).all()
    assert err.max() < 13.0 and err.mean() < 4.5
    assert err.mean() > 0.5  # per-image jitter is applied, not a copy of the template
    # left/right order as in the template
    assert (lmk[:, 0, 0] < lmk[:, 1, 0]).all() and (lmk[:, 3, 0] < lmk[:, 4, 0]).all()


def test_loose_crops_are_unaligned_and_landmarks_inside():
    faces = [_photo(i, loose_size=176) for i in range(20)]
    assert all(f.image.shape == (176, 176, 3) and f.image.dtype == np.uint8 for f in faces)
    lmk = np.stack([f.landmarks for f in faces])
    assert (lmk > 0).all() and (lmk < 176).all()
    offsets = np.linalg.norm(lmk.mean(axis=1) - TEMPLATE.mean(axis=0), axis=1)
    assert offsets.mean() > 10.0  # not at the aligned positions
    angles = np.degrees(np.arctan2(*(lmk[:, 1] - lmk[:, 0]).T[::-1]))
    assert np.ptp(angles) > 8.0  # in-plane rotation varies


@pytest.mark.parametrize("loose_size", [None, 176])
def test_landmarks_agree_with_pixels(loose_size):
    """Colour-codes iris (pure green) and lips (pure blue) and finds them in the image."""
    for i in range(6):
        idn = sample_identity(np.random.default_rng([9, 0, i]))
        idn = dataclasses.replace(
            idn, iris=np.array([0.0, 255.0, 0.0]), lips=np.array([0.0, 0.0, 255.0]),
            moustache=False, beard=False, glasses=False,
        )  # fmt: skip
        rng = np.random.default_rng([9, 1, i])
        shot = sample_shot(rng)._replace(
            gaze=np.zeros(2), eye_open=1.0, mouth_open=0.0, occlusion="", blur_sigma=0.0,
            noise_sigma=0.0, brightness=1.0, contrast=1.0, gamma=1.0,
        )  # fmt: skip
        grey = np.full((2, 3), 128.0, np.float32)
        scene = sample_scene(rng)._replace(
            background=grey, clothes=grey[0], light_strength=0.0, white_balance=np.ones(3)
        )
        face = render_face(idn, shot, scene, rng, loose_size=loose_size)
        img = face.image.astype(int)
        r, g, b = img[..., 0], img[..., 1], img[..., 2]
        ys, xs = np.mgrid[: img.shape[0], : img.shape[1]]
        for eye in face.landmarks[:2]:
            near = np.hypot(xs - eye[0], ys - eye[1]) < 6
            green = near & (g > 150) & (r < 100) & (b < 100)
            assert green.sum() >= 4
            centroid = np.array([xs[green].mean(), ys[green].mean()])
            assert np.linalg.norm(centroid - eye) < 1.0
        left, right = face.landmarks[3].astype(float), face.landmarks[4].astype(float)
        centre, axis = 0.5 * (left + right), (right - left) / np.linalg.norm(right - left)
        near = np.hypot(xs - centre[0], ys - centre[1]) < 0.75 * np.linalg.norm(right - left)
        blue = near & (b > 90) & (r < 60) & (g < 60)
        pts = np.stack([xs[blue], ys[blue]], axis=1).astype(float)
        proj = (pts - centre) @ axis
        assert np.linalg.norm(pts[proj.argmin()] - left) < 2.5
        assert np.linalg.norm(pts[proj.argmax()] - right) < 2.5


# --- the generated folder ---------------------------------------------------------------------


def test_generate_is_deterministic_and_seed_dependent(tiny, tmp_path):
    again = _files(demo.generate_demo(tmp_path / "same", seed=3, **TINY))
    assert again == _files(tiny)
    other = _files(demo.generate_demo(tmp_path / "other", seed=4, **TINY))

    # The same files, but for the occluded probes' images: which templates are probes is drawn.
    def fixed(files):
        return {k for k in files if "/occ_" not in k}

    assert fixed(other) == fixed(again)
    for name in ["train.rec", "demo_lfw.bin", "ijb/loose_crop/1.jpg"]:
        assert other[name] != again[name], name
    assert other["ijb/meta/demo_name_5pts_score.txt"] != again["ijb/meta/demo_name_5pts_score.txt"]


def test_train_rec_labels_and_images(tiny):
    assert (tiny / "property").read_text().strip() == "3,112,112"
    reader = IndexedRecordReader(tiny / "train.rec", tiny / "train.idx")
    header, _ = unpack_payload(reader.read(0))
    first_identity = int(np.asarray(header.label).ravel()[0])
    labels = []
    for key in range(1, first_identity):
        h, img = unpack_payload(reader.read(key))
        labels.append(int(np.asarray(h.label).ravel()[0]))
        assert _decode(img).shape == (112, 112, 3)
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]
    readme = " ".join((tiny / "README.txt").read_text().split())
    assert "synthetic stand-in for real face data" in readme
    assert "seed 3" in (tiny / "README.txt").read_text()


def test_bin_is_plain_lfw_pickle(tiny):
    with open(tiny / "demo_lfw.bin", "rb") as f:
        bins, issame = pickle.load(f)
    assert isinstance(bins, list) and isinstance(issame, list)
    assert len(issame) == 20 and len(bins) == 40
    assert all(type(v) is bool for v in issame) and sum(issame) == 10
    assert all(isinstance(b, bytes) for b in bins)
    for b in bins:
        assert _decode(b).shape == (112, 112, 3)
    # every contiguous tenth (an arcface_torch fold) holds both kinds of pair
    for fold in np.array_split(np.array(issame), 10):
        assert fold.any() and not fold.all()
    pairs = [(bins[2 * k], bins[2 * k + 1]) for k in range(20)]
    assert all(a != b for a, b in pairs)  # never an image paired with itself
    assert len(set(pairs)) == 20  # no repeated pair


def test_hard_set_pairs_references_with_hard_photos(tiny):
    with open(tiny / "demo_hard.bin", "rb") as f:
        bins, issame = pickle.load(f)
    assert len(issame) == 20 and sum(issame) == 10 and len(bins) == 40
    for fold in np.array_split(np.array(issame), 10):
        assert fold.any() and not fold.all()
    references, hard = set(bins[0::2]), set(bins[1::2])
    assert not references & hard  # every pair: a reference photo, then a hard one
    assert len(references) <= 4 * 2 and len(hard) <= 4 * 2  # 2 of each per identity
    assert len({(a, b) for a, b in zip(bins[0::2], bins[1::2])}) == 20


def _flat_render(identity, shot, scene, rng, *, loose_size=None):
    """Stand-in renderer: a flat image whose grey level follows the shot (no drawing)."""
    from otface.demo.render import RenderedFace

    size = loose_size or 112
    level = int(255 * (shot.yaw + 1) / 2)
    lmk = TEMPLATE.astype(np.float32) + (size - 112) / 2
    return RenderedFace(np.full((size, size, 3), level, np.uint8), lmk)


@pytest.fixture(scope="module")
def default_sizes(tmp_path_factory):
    """The data set at its shipped sizes, drawn by the stand-in renderer: the same writers and
    pair logic as the real build, in seconds instead of a minute."""
    import otface.demo.ijb as ijb_writer
    import otface.demo.photos as photos

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(photos, "render_face", _flat_render)
        mp.setattr(ijb_writer, "render_face", _flat_render)
        root = demo.generate_demo(tmp_path_factory.mktemp("default") / "d", seed=0)
        again = tmp_path_factory.mktemp("again")
        ijb_writer.write_ijb_set(again / "ijb", 0, 256 + 300, photos.identities(0, 556, 160), 8,
                                 100_000)  # fmt: skip
    return root, again


@pytest.mark.slow
def test_default_sizes_reach_lfw_and_ijb_power(default_sizes):
    root, again = default_sizes
    for name in ("demo_lfw", "demo_hard"):
        with open(root / f"{name}.bin", "rb") as f:
            bins, issame = pickle.load(f)
        assert len(issame) == 6000 and len(bins) == 12000 and sum(issame) == 3000
        for fold in np.array_split(np.array(issame), 10):  # 10 folds of 300 + 300
            assert fold.sum() == 300
    _, _, pairs = _read_ijb(root / "ijb")
    n_impostor = int((pairs[:, 2] == 0).sum())
    assert n_impostor == 100_000 and n_impostor * 1e-4 >= 10  # TAR@1e-4 rests on 10 impostors
    assert len({(a, b) for a, b, _ in pairs}) == len(pairs)
    assert (pairs[:, 2] == 1).sum() >= 2 * 160 // 2  # every identity has >= 2 templates
    # The generator is deterministic at full size too: the IJB layout drawn again is the same.
    for meta in ("demo_face_tid_mid.txt", "demo_template_pair_label.txt"):
        assert (again / "ijb/meta" / meta).read_bytes() == (root / "ijb/meta" / meta).read_bytes()
    readme = (root / "README.txt").read_text()
    assert "6000 pairs" in readme and "100000 impostor pairs" in readme


def _read_ijb(root: Path):
    tid_mid = [ln.split() for ln in (root / "meta/demo_face_tid_mid.txt").read_text().splitlines()]
    pts = [ln.split() for ln in (root / "meta/demo_name_5pts_score.txt").read_text().splitlines()]
    pairs = np.loadtxt(root / "meta/demo_template_pair_label.txt", dtype=int, ndmin=2)
    return tid_mid, pts, pairs


def test_ijb_meta_consistent(tiny):
    root = tiny / "ijb"
    tid_mid, pts, pairs = _read_ijb(root)
    assert len(tid_mid) == 4 * 5
    assert [row[0] for row in tid_mid] == [row[0] for row in pts]  # same rows, same order
    originals = sorted(p.name for p in (root / "loose_crop").iterdir() if "occ_" not in p.name)
    assert originals == sorted(r[0] for r in pts)
    for row in pts:
        assert len(row) == 12
        lmk = np.array(row[1:11], float).reshape(5, 2)
        img = _decode((root / "loose_crop" / row[0]).read_bytes())
        assert img.shape[:2] == (176, 176)
        assert (lmk > 0).all() and (lmk < 176).all()
        assert 0.3 <= float(row[11]) <= 1.0
    templates = np.array([int(r[1]) for r in tid_mid])
    medias = np.array([int(r[2]) for r in tid_mid])
    for t in np.unique(templates):
        assert 1 <= (templates == t).sum() <= 4
        assert 1 <= len(np.unique(medias[templates == t])) <= 2
    for m in np.unique(medias):  # a media belongs to one template
        assert len(np.unique(templates[medias == m])) == 1
    assert set(pairs[:, :2].ravel()) <= set(templates.tolist())
    assert set(pairs[:, 2].tolist()) == {0, 1}
    assert (pairs[:, 2] == 0).sum() == 10
    assert (pairs[:, 2] == 1).sum() >= 4  # at least two templates per identity
    assert len({(a, b) for a, b, _ in pairs}) == len(pairs)
    assert (pairs[:, 0] != pairs[:, 1]).all()


def _csv_rows(path: Path) -> list[list[str]]:
    return [ln.split(",") for ln in path.read_text().splitlines()[1:]]


def test_ijb_occluded_target(tiny):
    """demo_occluded: demo's galleries, demo's probe templates photographed again with one
    occluder each, and demo's gallery-probe pairs; readable as an IJB target."""
    from otface.demo.ijb import PROBE_OCCLUDERS
    from otface.evaluation.ijb_meta import read_ijb_1n_meta, read_ijb_meta

    root = tiny / "ijb"
    meta = root / "meta"
    for g in ("G1", "G2"):
        assert (meta / f"demo_occluded_1N_gallery_{g}.csv").read_bytes() == (
            meta / f"demo_1N_gallery_{g}.csv"
        ).read_bytes()
    probes = _csv_rows(meta / "demo_1N_probe_mixed.csv")
    occluded = _csv_rows(meta / "demo_occluded_1N_probe_mixed.csv")
    assert [(t, s, "occ_" + n) for t, s, n in probes] == [tuple(r) for r in occluded]
    kinds = dict(ln.split() for ln in (meta / "demo_occluded_probe_occluders.txt").read_text()
                 .splitlines())  # fmt: skip
    assert set(kinds) == {t for t, _, _ in probes} and set(kinds.values()) <= set(PROBE_OCCLUDERS)
    for _, _, name in probes:
        a = _decode((root / "loose_crop" / name).read_bytes()).astype(int)
        b = _decode((root / "loose_crop" / f"occ_{name}").read_bytes()).astype(int)
        # the same photo, an occluder drawn over part of the face (a hand can be small)
        assert a.shape == b.shape and (np.abs(a - b).max(-1) > 30).mean() > 1e-3
    gallery = {r[0] for g in ("G1", "G2") for r in _csv_rows(meta / f"demo_1N_gallery_{g}.csv")}
    pairs = np.loadtxt(meta / "demo_template_pair_label.txt", dtype=str, ndmin=2).tolist()
    mixed = [p for p in pairs if (p[0] in gallery) != (p[1] in gallery)]
    kept = np.loadtxt(meta / "demo_occluded_template_pair_label.txt", dtype=str, ndmin=2)
    assert kept.tolist() == mixed and len(mixed) > 0
    ijb = read_ijb_meta(root, "demo_occluded")
    assert sorted(set(ijb.templates.tolist())) == sorted(int(t) for t in gallery | set(kinds))
    one_n = read_ijb_1n_meta(root, "demo_occluded", np.unique(ijb.templates))
    assert len(one_n.probe_templates) == len(kinds)


def test_parts_use_disjoint_identities(tmp_path, monkeypatch):
    import otface.data.rec_writer as rec_writer
    import otface.demo.ijb as ijb_writer
    import otface.demo.photos as photos

    parts = ("train", "val", "hard", "ijb", "mask", "crop")
    seen: dict[str, set] = {k: set() for k in parts}
    phase = [""]
    real_render = photos.render_face

    def render(identity, *args, loose_size=None, **kw):
        key = (identity.face_half_w, identity.face_half_h, identity.eye_y, identity.mouth_y)
        seen["ijb" if loose_size else phase[0]].add(key)
        return real_render(identity, *args, loose_size=loose_size, **kw)

    def in_phase(name, real):
        def wrapped(*args, **kw):
            phase[0] = name
            return real(*args, **kw)

        return wrapped

    monkeypatch.setattr(photos, "render_face", render)
    monkeypatch.setattr(ijb_writer, "render_face", render)
    for name, module, attr in [
        ("train", rec_writer, "write_rec"),
        ("val", demo, "write_lfw_set"),
        ("hard", demo, "write_hard_set"),
        ("mask", demo, "write_mask_set"),
        ("crop", demo, "write_crop_set"),
    ]:
        monkeypatch.setattr(module, attr, in_phase(name, getattr(module, attr)))
    demo.generate_demo(tmp_path / "d", **TINY)
    assert [len(seen[k]) for k in parts] == [3, 4, 4, 4, 4, 4]
    for x, first in enumerate(parts):
        for second in parts[x + 1 :]:
            assert not seen[first] & seen[second], (first, second)


def test_bad_sizes_and_seed_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="val_pairs=100"):
        demo.generate_demo(tmp_path, **{**TINY, "val_pairs": 100})
    with pytest.raises(ValueError, match="seed.*-1"):
        demo.generate_demo(tmp_path, seed=-1)
    with pytest.raises(ValueError, match="ijb_identities.*1"):
        demo.generate_demo(tmp_path, **{**TINY, "ijb_identities": 1})


# --- the cache ----------------------------------------------------------------------------------


_REAL_GENERATE = demo.generate_demo


def _counting_generate(log: Path, out_dir, *, seed=0, train_occlusion_p=None):
    with open(log, "a") as f:
        f.write(f"{seed}\n")
    return _REAL_GENERATE(out_dir, seed=seed, train_occlusion_p=train_occlusion_p, **TINY)


@pytest.fixture
def counted(tmp_path, monkeypatch) -> Path:
    log = tmp_path / "calls.log"
    log.touch()
    monkeypatch.setattr(demo, "generate_demo", functools.partial(_counting_generate, log))
    return log


def test_ensure_demo_builds_once(tmp_path, counted, monkeypatch):
    root = tmp_path / "cache"
    first = demo.ensure_demo(root, seed=2)
    assert first == root / f"demo_v{demo.FORMAT_VERSION}_seed2"
    assert (first / "train.rec").is_file() and (first / "ijb/meta").is_dir()
    assert demo.ensure_demo(root, seed=2) == first
    assert counted.read_text().split() == ["2"]
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    monkeypatch.setenv("OTFACE_CACHE", str(root))
    assert demo.ensure_demo(seed=2) == first
    assert counted.read_text().split() == ["2"]


def test_ensure_demo_survives_leftovers(tmp_path, counted):
    root = tmp_path / "cache"
    name = f"demo_v{demo.FORMAT_VERSION}_seed0"
    (root / f".{name}.tmp-12345-dead").mkdir(parents=True)
    (root / f".{name}.tmp-12345-dead" / "train.rec").write_bytes(b"partial")
    (root / name).mkdir()  # a folder without the completion marker: rebuilt
    (root / name / "junk").write_text("x")
    out = demo.ensure_demo(root)
    assert (out / "demo_lfw.bin").is_file() and not (out / "junk").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


def test_ensure_demo_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken(out_dir, *, seed=0, train_occlusion_p=None):
        Path(out_dir, "train.rec").parent.mkdir(parents=True, exist_ok=True)
        Path(out_dir, "train.rec").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "generate_demo", broken)
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk full"):
        demo.ensure_demo(root)
    assert sorted(p.name for p in root.iterdir()) == [f"demo_v{demo.FORMAT_VERSION}_seed0.lock"]


def _ensure_in_child(root: str, queue) -> None:
    queue.put(str(demo.ensure_demo(root)))


def test_ensure_demo_concurrent_processes_build_once(tmp_path, counted):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(str(tmp_path / "c"), queue)) for _ in "ab"]
    for p in procs:
        p.start()
    results = {queue.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert results == {str(tmp_path / "c" / f"demo_v{demo.FORMAT_VERSION}_seed0")}
    assert counted.read_text().split() == ["0"]


def test_cli_writes_folder(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(out, seed, train_occlusion_p):
        calls.append((out, seed, train_occlusion_p))
        return out

    monkeypatch.setattr(demo, "generate_demo", fake)
    assert demo.main([str(tmp_path / "x"), "--seed", "5"]) == 0
    assert demo.main([str(tmp_path / "y"), "--train-occlusion-p", "0"]) == 0
    assert calls == [(str(tmp_path / "x"), 5, None), (str(tmp_path / "y"), 0, 0.0)]
    assert "wrote" in capsys.readouterr().out
