"""Tests for otface.evaluation.{metrics (ROC, TAR@FAR), ijb_meta, ijb} and eval/ijb.py.

References: sklearn's roc_curve read as a polyline by a plain loop, hand-pooled templates on a
hand-made layout, a known similarity warp, the PyTorch model against its ONNX export, and the
demo's own meta files for ``--data demo``.
"""

import functools
import importlib.util
import re

import cv2
import numpy as np
import pytest
import torch
from _scripts import error_line, load_eval_script
from sklearn.metrics import roc_curve as sk_roc_curve

from otface.evaluation import ijb as ijb_mod
from otface.evaluation.ijb import (
    FeatureOptions,
    VerifyOptions,
    align_face,
    evaluate_ijb,
    feature_cache_key,
    pool_templates,
    score_pairs,
)
from otface.evaluation.ijb_meta import IJBLayoutError, read_ijb_meta
from otface.evaluation.metrics import roc_curve, tar_at_far

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
ARCFACE_TEMPLATE = np.array(  # the standard 112×112 five-point template (a published fact)
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
     [70.7299, 92.2041]], dtype=np.float32,
)  # fmt: skip


def _sk_polyline_tar(scores, labels, fars):
    """TAR read off sklearn's ROC as a polyline; the top where it rises vertically."""
    fpr, tpr, _ = sk_roc_curve(labels, scores)
    out = []
    for far in fars:
        best = 0.0
        for k in range(len(fpr) - 1):
            x0, x1, y0, y1 = fpr[k], fpr[k + 1], tpr[k], tpr[k + 1]
            if x0 <= far <= x1:
                y = max(y0, y1) if x1 == x0 else y0 + (y1 - y0) * (far - x0) / (x1 - x0)
                best = max(best, y)
        out.append(best)
    return np.array(out)


def _scores(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.2).astype(int)
    scores = np.round(rng.normal(size=n) + 2.5 * labels, 2)  # rounding makes ties
    return scores, labels


def _sk_arcface_torch_tar(scores, labels, fars):
    """arcface_torch's table reading, restated: sklearn's default (thinned) ROC, reversed, and
    the first point of minimal FAR gap in that reversed order."""
    fpr, tpr, _ = sk_roc_curve(labels, scores)
    fpr, tpr = fpr[::-1], tpr[::-1]
    return np.array([tpr[int(np.argmin(np.abs(fpr - far)))] for far in fars])


@pytest.mark.parametrize("drop_intermediate", [False, True])
def test_roc_curve_equals_sklearn(drop_intermediate):
    scores, labels = _scores()
    ours = roc_curve(scores, labels, drop_intermediate=drop_intermediate)
    fpr, tpr, thr = sk_roc_curve(labels, scores, drop_intermediate=drop_intermediate)
    assert len(ours.far) == len(fpr)
    np.testing.assert_allclose(ours.far, fpr)
    np.testing.assert_allclose(ours.tar, tpr)
    np.testing.assert_allclose(ours.threshold[1:], thr[1:])


@pytest.mark.parametrize("seed", [0, 1])
def test_tar_at_far_equals_sklearn_interpolation(seed):
    scores, labels = _scores(seed=seed)
    n_neg = int((labels == 0).sum())
    fars = list(FARS) + [3 / n_neg, 0.25, 1.0]  # some exactly on ROC vertices
    got = tar_at_far(scores, labels, fars=fars, method="interp")
    np.testing.assert_allclose(got, _sk_polyline_tar(scores, labels, fars), atol=1e-12)


def test_tar_at_far_arcface_torch_rule_by_hand():
    # Distinct scores from high to low: G I I I G I G (G genuine, I impostor); 4 impostors,
    # 3 genuine. Cumulative (impostor, genuine) counts: (0,1) (1,1) (2,1) (3,1) (3,2) (4,2)
    # (4,3). (1,1) and (2,1) sit inside a run of equal steps (1,0) and are dropped, so the
    # thinned ROC is FAR 0 0 .75 .75 1 1 / TAR 0 1/3 1/3 2/3 2/3 1.
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, 0, 0, 0, 1, 0, 1])
    fars = (0.25, 0.375, 0.5, 0.75)
    # 0.25: nearest kept points are the two at FAR 0 → the later one, TAR 1/3.
    # 0.375: FAR 0 and FAR .75 are equally near → the larger FAR, then the larger TAR: 2/3.
    # 0.5: FAR .75 is nearest (the full ROC would have a point at .5 with TAR 1/3) → 2/3.
    # 0.75: the later of the two points there → 2/3.
    expected = [1 / 3, 2 / 3, 2 / 3, 2 / 3]
    np.testing.assert_allclose(tar_at_far(scores, labels, fars=fars), expected)
    np.testing.assert_allclose(_sk_arcface_torch_tar(scores, labels, fars), expected)
    # Interpolation on the full ROC: 1/3 along the flat run up to FAR .75, then its top.
    np.testing.assert_allclose(
        tar_at_far(scores, labels, fars=fars, method="interp"), [1 / 3, 1 / 3, 1 / 3, 2 / 3]
    )


@pytest.mark.parametrize("seed", [2, 3])
def test_tar_at_far_arcface_torch_equals_its_reading(seed):
    scores, labels = _scores(seed=seed)
    n_neg = int((labels == 0).sum())
    fars = list(FARS) + [2.5 / n_neg, 0.3]
    got = tar_at_far(scores, labels, fars=fars)
    np.testing.assert_array_equal(got, _sk_arcface_torch_tar(scores, labels, fars))
    with pytest.raises(ValueError, match="'arcface_torch', 'interp'.*'closest'"):
        tar_at_far(scores, labels, method="closest")


def test_pool_templates_by_hand():
    f = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 2], [3, 4, 0], [1, 1, 1]])
    templates = np.array([7, 7, 7, 3, 7])
    medias = np.array([10, 10, 11, 5, 10])
    pooled = pool_templates(f, templates, medias)
    assert pooled.templates.tolist() == [3, 7]
    t7 = (f[0] + f[1] + f[4]) / 3 + f[2]  # media 10 averaged, media 11 alone, then summed
    expected = np.stack([f[3] / 5.0, t7 / np.linalg.norm(t7)])
    np.testing.assert_allclose(pooled.features, expected, rtol=1e-6)


def test_score_pairs_chunked_cosine():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 8))
    pooled = pool_templates(feats, np.array([4, 9, 2, 8, 1]), np.arange(5))
    pairs = np.array([[4, 9], [2, 2], [1, 8], [9, 1], [8, 4]])
    got = score_pairs(pooled, pairs, chunk_size=2)
    unit = {t: v / np.linalg.norm(v) for t, v in zip([4, 9, 2, 8, 1], feats)}
    np.testing.assert_allclose(got, [unit[a] @ unit[b] for a, b in pairs], rtol=1e-5)
    with pytest.raises(ValueError, match="template 5"):
        score_pairs(pooled, np.array([[4, 5]]))


def _write_layout(root, names, templates, medias, pairs, *, target="tiny", scores=None):
    meta, crops = root / "meta", root / "loose_crop"
    meta.mkdir(parents=True, exist_ok=True)
    crops.mkdir(exist_ok=True)
    scores = scores if scores is not None else [0.9] * len(names)
    lmk = " ".join(f"{v:.4f}" for v in ARCFACE_TEMPLATE.reshape(-1))
    (meta / f"{target}_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in zip(names, templates, medias))
    )
    (meta / f"{target}_name_5pts_score.txt").write_text(
        "".join(f"{n} {lmk} {s}\n" for n, s in zip(names, scores))
    )
    (meta / f"{target}_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {y}\n" for a, b, y in pairs)
    )
    return root


def test_evaluate_ijb_on_known_features(tmp_path):
    rng = np.random.default_rng(3)
    n_faces, n_templates = 40, 12
    templates = np.repeat(np.arange(1, n_templates + 1), [4, 3, 3, 3, 4, 3, 3, 4, 3, 3, 4, 3])
    medias = np.arange(n_faces) // 2 + 100
    identity = (templates - 1) // 2  # templates 2k+1 and 2k+2 show one person
    feats = rng.normal(size=(6, 16))[identity] + 0.8 * rng.normal(size=(n_faces, 16))
    faceness = rng.uniform(0.3, 1.0, n_faces).round(3)
    pairs = [
        (a, b, int((a - 1) // 2 == (b - 1) // 2))
        for a in range(1, n_templates + 1)
        for b in range(a + 1, n_templates + 1)
    ]
    names = [f"{i}.jpg" for i in range(n_faces)]
    root = _write_layout(tmp_path / "ijb", names, templates, medias, pairs, scores=faceness)
    cache = tmp_path / "feats.npy"
    np.save(cache, feats.astype(np.float32))
    labels = np.array([p[2] for p in pairs])
    for weighted in (False, True):
        res = evaluate_ijb(
            None,
            root,
            "tiny",
            features=FeatureOptions(faceness=weighted),
            verify=VerifyOptions(tar_method="interp"),
            cache_file=cache,
        )
        w = feats * faceness[:, None] if weighted else feats
        tfeat = {}
        for t in np.unique(templates):  # hand pooling: media means, summed, normalised
            sel = templates == t
            v = sum(w[sel & (medias == m)].mean(0) for m in np.unique(medias[sel]))
            tfeat[t] = v / np.linalg.norm(v)
        ref_scores = np.array([tfeat[a] @ tfeat[b] for a, b, _ in pairs])
        np.testing.assert_allclose(res.scores, ref_scores, atol=1e-5)
        np.testing.assert_allclose(res.tars, _sk_polyline_tar(res.scores, labels, FARS))
        assert (res.num_faces, res.num_templates) == (n_faces, n_templates)
    # The default: arcface_torch's reading of the ROC.
    default = evaluate_ijb(None, root, "tiny", cache_file=cache)
    np.testing.assert_array_equal(default.tars, _sk_arcface_torch_tar(default.scores, labels, FARS))


def test_layout_errors_name_file_and_line(tmp_path):
    names = ["a.jpg", "b.jpg", "c.jpg"]
    root = _write_layout(tmp_path / "d", names, [1, 1, 2], [1, 2, 3], [(1, 2, 0)])
    assert len(read_ijb_meta(root, "TINY").image_names) == 3  # target case does not matter
    with pytest.raises(IJBLayoutError, match=r"missing .*ijbc_face_tid_mid\.txt.*\['tiny'\]"):
        read_ijb_meta(root, "IJBC")
    meta = root / "meta"
    pairs_file = meta / "tiny_template_pair_label.txt"
    pairs_file.write_text("1 2 0\n1 2 x\n")
    with pytest.raises(IJBLayoutError, match=r"tiny_template_pair_label\.txt line 2"):
        read_ijb_meta(root, "tiny")
    pairs_file.write_text("1 2 0\n2 1 2\n")
    with pytest.raises(IJBLayoutError, match="line 2: label must be 0 or 1"):
        read_ijb_meta(root, "tiny")
    pairs_file.write_text("1 2 0\n1 9 1\n")
    with pytest.raises(IJBLayoutError, match="line 2: template 9 has no face"):
        read_ijb_meta(root, "tiny")
    pairs_file.write_text("1 2 0\n")
    tid = meta / "tiny_face_tid_mid.txt"
    tid.write_text("a.jpg 1 1\nx.jpg 1 2\nc.jpg 2 3\n")
    with pytest.raises(IJBLayoutError, match=r"tiny_face_tid_mid\.txt line 2: image differs"):
        read_ijb_meta(root, "tiny")
    tid.write_text("a.jpg 1 1\nb.jpg 1 2\n")
    with pytest.raises(IJBLayoutError, match="2 lines but .* has 3"):
        read_ijb_meta(root, "tiny")
    tid.write_text("a.jpg 1 1\nb.jpg 1 2\nc.jpg 2 3\n")
    pts = meta / "tiny_name_5pts_score.txt"
    pts.write_text(pts.read_text().replace("0.9\nc.jpg", "\nc.jpg"))
    with pytest.raises(IJBLayoutError, match=r"tiny_name_5pts_score\.txt line 2"):
        read_ijb_meta(root, "tiny")
    with pytest.raises(IJBLayoutError, match="does not exist"):
        read_ijb_meta(tmp_path / "nowhere", "tiny")


def test_align_face_undoes_a_known_similarity():
    rng = np.random.default_rng(0)
    face = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (0, 0), 3)
    angle, scale, shift = 12.0, 1.4, np.array([40.0, 25.0])
    m = cv2.getRotationMatrix2D((0, 0), angle, scale)
    m[:, 2] = shift
    loose = cv2.warpAffine(face, m, (240, 240), flags=cv2.INTER_CUBIC)
    landmarks = ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2]
    aligned = align_face(loose, landmarks)
    assert aligned.shape == (112, 112, 3)
    inner = (slice(8, 104), slice(8, 104))
    err = np.abs(aligned[inner].astype(float) - face[inner].astype(float)).mean()
    assert err < 2.0  # only resampling error left
    identity = align_face(face, ARCFACE_TEMPLATE)
    assert np.abs(identity.astype(float) - face.astype(float)).max() <= 1


def _table_values(path):
    """The TAR cells of the table's first row: NaN where it prints none ("-"), a "*" mark
    (few impostor pairs) dropped."""
    row = path.read_text().splitlines()[3]
    cells = [v.strip().rstrip("*") for v in row.strip("| ").split("|")[1:]]
    return np.array([float("nan") if v == "-" else float(v) for v in cells])


def test_demo_end_to_end_pt_and_onnx(tmp_path, monkeypatch, tiny_demo):
    from otface.backbones import get_model
    from otface.export import export_model

    data = tiny_demo
    work = tmp_path / "work"
    work.mkdir()
    torch.manual_seed(0)
    torch.save(get_model("r18_lite").state_dict(), work / "model.pt")
    onnx_path = export_model(work, network="r18_lite", package=False, local_features=True).onnx_path
    script = load_eval_script("ijb")
    common = ["--data", str(data / "ijb"), "--target", "demo", "--num-workers", "2"]
    pt_args = ["--model", str(work / "model.pt"), "--network", "r18_lite", "--device", "cpu"]
    assert script.main(pt_args + common + ["--output", str(tmp_path / "pt")]) == 0
    ox_args = ["--model", str(onnx_path), "--output", str(tmp_path / "ox")]
    assert script.main(ox_args + common) == 0
    pt_scores = np.load(tmp_path / "pt" / "demo_scores.npy")
    ox_scores = np.load(tmp_path / "ox" / "demo_scores.npy")
    np.testing.assert_allclose(pt_scores, ox_scores, atol=1e-4)
    # Re-scoring an ONNX model reads model_local.onnx; stage 1 stays model.onnx's own.
    rerank = ["--rerank", "ot", "--output", str(tmp_path / "ox_rr")]
    assert script.main(ox_args[:2] + common + rerank) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "ox_rr" / "demo_scores.npy"), ox_scores)
    assert np.load(tmp_path / "ox_rr" / "demo_scores_rerank_ot.npy").shape == ox_scores.shape
    pt_table = _table_values(tmp_path / "pt" / "demo_tar_at_far.txt")
    np.testing.assert_allclose(pt_table, _table_values(tmp_path / "ox" / "demo_tar_at_far.txt"))
    labels = np.loadtxt(data / "ijb" / "meta" / "demo_template_pair_label.txt", dtype=int)[:, 2]
    ref = 100 * _sk_arcface_torch_tar(pt_scores, labels, FARS)
    shown = np.isfinite(pt_table)
    assert shown.sum() >= 1  # the FARs with at least one impostor pair (40 of them here)
    np.testing.assert_allclose(pt_table[shown], ref[shown], atol=0.006)  # 2 decimals
    assert len(list((tmp_path / "pt").glob("demo_features_*.npy"))) == 1
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "pt" / "demo.png").is_file() and (tmp_path / "pt" / "demo.pdf").is_file()

    def no_extraction(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(ijb_mod, "extract_features", no_extraction)
    assert script.main(pt_args + common + ["--output", str(tmp_path / "pt")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "pt" / "demo_scores.npy"), pt_scores)
    # the flip setting is part of the cache key: --no-flip must extract again
    with pytest.raises(AssertionError, match="cache"):
        script.main(pt_args + common + ["--output", str(tmp_path / "pt"), "--no-flip"])


def test_cli_missing_optional_package_is_an_error_line(tmp_path, monkeypatch, capsys):
    root = _write_layout(
        tmp_path / "ijb", ["0.jpg", "1.jpg"], [1, 2], [5, 6], [(1, 2, 0)], scores=[0.9, 0.8]
    )
    (tmp_path / "model.onnx").write_bytes(b"")
    script = load_eval_script("ijb")

    def no_onnxruntime(*args, **kwargs):
        raise ImportError("reading ONNX models needs onnxruntime: pip install onnxruntime")

    monkeypatch.setattr(script, "open_embedder", no_onnxruntime)
    argv = ["--model", str(tmp_path / "model.onnx"), "--data", str(root), "--target", "tiny"]
    assert script.main(argv) == 1
    assert "error: reading ONNX models needs onnxruntime" in capsys.readouterr().err


SMALL_DEMO = dict(
    train_identities=2,
    images_per_identity=1,
    val_identities=2,
    val_images_per_identity=2,
    val_pairs=2,
    hard_identities=2,
    hard_images_per_identity=2,
    hard_pairs=2,
    ijb_identities=6,
    ijb_images_per_identity=4,
    ijb_impostor_pairs=30,
)
TRAINING_LOG = """\
Training: 2024-05-01 10:00:00,001-: loss                     otface
Training: 2024-05-01 10:00:00,001-: network                  r50
Training: 2024-05-01 10:00:00,002-: embedding_size           512
Training: 2024-05-01 10:00:09,000-Speed 120.00 samples/sec   Loss 41.2000   LearningRate 0.1000
Training: 2024-05-01 11:00:00,001-: loss                     otface
Training: 2024-05-01 11:00:00,001-: network                  r18_lite
Training: 2024-05-01 11:00:00,002-: embedding_size           512
"""  # a second run into the same folder appends its own dump: the last one is the model's


@pytest.fixture(scope="module")
def _demo_cache(tmp_path_factory):
    """A cache folder holding a small demo set, built by the real ensure_demo."""
    from otface.demo import generate as demo

    root = tmp_path_factory.mktemp("otface_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "generate_demo", functools.partial(demo.generate_demo, **SMALL_DEMO))
        demo.ensure_demo(root)
    return root


@pytest.fixture
def demo_env(_demo_cache, monkeypatch):
    """$OTFACE_CACHE points at the small demo; building another one is an error."""
    from otface.demo import generate as demo

    def no_build(*args, **kwargs):
        raise AssertionError("the demo data should come from $OTFACE_CACHE")

    monkeypatch.setenv("OTFACE_CACHE", str(_demo_cache))
    monkeypatch.setattr(demo, "generate_demo", no_build)
    return _demo_cache / f"demo_v{demo.FORMAT_VERSION}_seed0"


def _run_dir(path, *, seed=0, log=True):
    """A training output folder: an r18_lite model.pt and, with ``log``, a training.log."""
    from otface.backbones import get_model

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(get_model("r18_lite").state_dict(), path / "model.pt")
    if log:
        (path / "training.log").write_text(TRAINING_LOG)
    return path


def test_cli_data_demo_with_network_from_training_log(tmp_path, demo_env, capsys):
    run = _run_dir(tmp_path / "demo_otface")
    script = load_eval_script("ijb")
    # neither --network nor --target: the log names r18_lite, --data demo means target "demo"
    argv = ["--model", str(run / "model.pt"), "--data", "demo", "--device", "cpu"]
    assert script.main(argv + ["--num-workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"results in {run / 'ijb_demo'}" in out
    meta = demo_env / "ijb" / "meta"
    n_faces = len((meta / "demo_face_tid_mid.txt").read_text().splitlines())
    n_pairs = len((meta / "demo_template_pair_label.txt").read_text().splitlines())
    assert f"{n_faces} faces" in out and f"{n_pairs} pairs" in out
    assert len(np.load(run / "ijb_demo" / "demo_scores.npy")) == n_pairs
    assert len(list((run / "ijb_demo").glob("demo_features_*.npy"))) == 1
    # an explicit --network wins over the log
    assert script.main(argv + ["--network", "r50"]) == 1
    line = error_line(capsys)
    assert "does not match --network 'r50'" in line and "looks like network 'r18_lite'" in line


def test_feature_cache_key_covers_model_content_network_and_flip(tmp_path):
    meta = tmp_path / "demo_name_5pts_score.txt"
    meta.write_text("a.jpg 1 2 3 4 5 6 7 8 9 10 0.9\n")
    weights = bytes(range(256)) * 8
    a, b = tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(weights)
    key = functools.partial(feature_cache_key, meta_file=meta)
    base = key(a, flip=True, network="r18_lite")
    assert key(b, flip=True, network="r18_lite") == base  # the content counts, not the path
    others = {
        key(a, flip=False, network="r18_lite"),
        key(a, flip=True, network="r50"),
        key(a, flip=True, network=None),
    }
    assert len(others) == 3 and base not in others
    b.write_bytes(weights[:-1] + b"\x00")  # one byte differs: a retrained model, same path
    assert key(b, flip=True, network="r18_lite") != base


def test_cli_cache_hit_still_checks_the_model(tmp_path, demo_env, monkeypatch, capsys):
    run = _run_dir(tmp_path / "work", log=False)
    script = load_eval_script("ijb")
    base = ["--model", str(run / "model.pt"), "--data", "demo", "--device", "cpu", "--no-flip"]
    assert script.main(base + ["--network", "r18_lite"]) == 0
    first = np.load(run / "ijb_demo" / "demo_scores.npy")

    def no_extraction(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(ijb_mod, "extract_features", no_extraction)
    assert script.main(base + ["--network", "r18_lite"]) == 0  # a cache hit
    np.testing.assert_array_equal(np.load(run / "ijb_demo" / "demo_scores.npy"), first)
    capsys.readouterr()
    # a cache exists, yet a wrong network name or architecture is refused
    assert script.main(base + ["--network", "banana"]) == 1
    line = error_line(capsys)
    assert "unknown network 'banana'" in line and "r18_lite" in line
    assert script.main(base + ["--network", "r50"]) == 1
    assert "does not match --network 'r50'" in error_line(capsys)
    assert script.main(base) == 1  # no --network and no training.log
    assert "pass --network" in error_line(capsys)
    # another model file at the same path misses the cache
    _run_dir(run, seed=1, log=False)
    with pytest.raises(AssertionError, match="cache"):
        script.main(base + ["--network", "r18_lite"])


def test_cli_unreadable_cache_is_rebuilt(tmp_path, demo_env, capsys):
    run = _run_dir(tmp_path / "work")
    script = load_eval_script("ijb")
    argv = ["--model", str(run / "model.pt"), "--data", "demo", "--device", "cpu", "--no-flip"]
    assert script.main(argv) == 0
    first = np.load(run / "ijb_demo" / "demo_scores.npy")
    (cache,) = (run / "ijb_demo").glob("demo_features_*.npy")
    cache.write_bytes(cache.read_bytes()[:100])  # an interrupted copy
    assert script.main(argv) == 0
    np.testing.assert_allclose(np.load(run / "ijb_demo" / "demo_scores.npy"), first, atol=1e-6)
    assert np.load(cache).shape[0] == len(read_ijb_meta(demo_env / "ijb", "demo").image_names)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_data", r"--data \S*nowhere does not exist \(pass a data folder, or 'demo'"),
        ("missing_model", r"model file .*nope\.pt does not exist"),
        ("unknown_target", r"for target 'IJBC'; targets found in .*\['demo', 'demo_occluded'\]"),
        ("device", "--device 'cuda:99'"),
        ("bad_device", "--device 'banana' is not a torch device; valid: cpu, cuda"),
        ("output_is_a_file", r"--output .*model\.pt is a file"),
        ("broken_onnx", r"cannot load .*broken\.onnx as an ONNX model"),
    ],
)
def test_cli_bad_input_is_one_error_line(tmp_path, demo_env, capsys, case, expected):
    run = _run_dir(tmp_path / "work")
    (run / "broken.onnx").write_bytes(b"not a protobuf")
    argv = {
        "missing_data": ["--data", str(tmp_path / "nowhere")],
        "missing_model": ["--model", str(run / "nope.pt")],
        "unknown_target": ["--target", "IJBC"],
        "device": ["--device", "cuda:99"],
        "bad_device": ["--device", "banana"],
        "output_is_a_file": ["--output", str(run / "model.pt")],
        "broken_onnx": ["--model", str(run / "broken.onnx")],
    }[case]
    base = ["--model", str(run / "model.pt"), "--data", "demo", "--device", "cpu"]
    assert load_eval_script("ijb").main(base + argv) == 1  # later options win in argparse
    assert re.search(expected, error_line(capsys))


def test_cli_batch_size_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        load_eval_script("ijb").main(["--model", "m.pt", "--data", "d", "--batch-size", "0"])
    assert exc.value.code == 2
    assert "--batch-size: must be >= 1, got 0" in capsys.readouterr().err


def test_table_marks_fars_that_rest_on_few_impostor_pairs():
    from otface.evaluation.ijb import IJBResult, format_table

    # 1,000 impostor pairs: FAR 1e-4 is 0.1 pair (no TAR), 1e-3 is 1 pair and 1e-2 is 10 pairs.
    labels = np.r_[np.zeros(1000), np.ones(50)]
    res = IJBResult(
        target="demo",
        fars=np.array([1e-4, 1e-3, 1e-2]),
        tars=np.array([0.5, 0.6, 0.7]),
        auc=0.9,
        scores=np.zeros(1050),
        labels=labels,
        num_faces=10,
        num_templates=5,
    )
    table = format_table({"m": res})
    row = next(line for line in table.splitlines() if "m-demo" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == ["-", "60.00*", "70.00"]
    assert "fewer than 10 impostor pairs" in table and "no TAR" in table


def test_cli_rerank_ot_both_protocols(tmp_path, demo_env, capsys):
    """--rerank ot prints stage 1 and stage 2 side by side for 1:1 and 1:N; stage 1 is the same
    as without it; the local features are cached (α = 0: tests/test_ijb_rerank.py)."""
    run = _run_dir(tmp_path / "demo_otface")
    script = load_eval_script("ijb")
    argv = ["--model", str(run / "model.pt"), "--data", "demo", "--device", "cpu"]
    argv += ["--num-workers", "1", "--protocol", "all"]
    plain, ranked = tmp_path / "plain", tmp_path / "ranked"
    assert script.main(argv + ["--output", str(plain)]) == 0
    capsys.readouterr()
    rerank = ["--rerank", "ot", "--patch-grid", "2", "--rerank-k", "2"]
    assert script.main(argv + rerank + ["--rerank-alpha", "0.5", "--output", str(ranked)]) == 0
    out = capsys.readouterr().out
    assert out.count("demo_otface+rerank-ot-demo") == 2  # one row per protocol
    line = r"rerank ot: alpha 0.5, patch grid 2x2, uniform marginals; \d+ pairs re-scored in"
    assert re.search(line, out)
    assert "top 2 per probe" in out
    # Stage 1 does not change when the faces are embedded by the local-feature pass.
    np.testing.assert_array_equal(
        np.load(ranked / "demo_scores.npy"), np.load(plain / "demo_scores.npy")
    )
    stage2 = np.load(ranked / "demo_scores_rerank_ot.npy")
    assert stage2.shape == np.load(plain / "demo_scores.npy").shape
    assert not np.array_equal(stage2, np.load(plain / "demo_scores.npy"))
    # 1:N: only each probe's 2 best templates were re-scored, the rest keep their order.
    stage1_1n = np.load(plain / "demo_1n_scores.npz")["similarity"]
    stage2_1n = np.load(ranked / "demo_1n_similarity_rerank_ot.npy")
    top = np.argsort(-stage1_1n, axis=1, kind="stable")
    rest1 = np.take_along_axis(stage1_1n, top[:, 2:], axis=1)
    rest2 = np.take_along_axis(stage2_1n, top[:, 2:], axis=1)
    np.testing.assert_array_equal(np.argsort(-rest1, axis=1), np.argsort(-rest2, axis=1))
    assert (np.take_along_axis(stage2_1n, top[:, :2], axis=1).min(1) > rest2.max(1)).all()
    assert len(list(ranked.glob("demo_local_*_2x2_faceness1.npy"))) == 1
    # A second run reads both caches instead of embedding again.
    assert script.main(argv + rerank + ["--output", str(ranked)]) == 0
    err = capsys.readouterr().err
    assert "IJB features read from cache" in err and "IJB local features read from cache" in err
