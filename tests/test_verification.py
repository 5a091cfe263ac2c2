"""Tests for otface.evaluation.{bin_io, metrics (k-fold), verification} and eval/verification.py.

References: pixels the test encodes itself, a hand-assembled Python-2 style pickle, a plain
loop over sklearn's KFold splits and thresholds.
"""

import functools
import logging
import pickle
import re

import cv2
import numpy as np
import pytest
import torch
from _scripts import error_line, load_eval_script
from sklearn.model_selection import KFold
from torch import nn

from otface.evaluation.bin_io import read_bin, write_bin
from otface.evaluation.metrics import kfold_accuracy
from otface.evaluation.models import TorchEmbedder
from otface.evaluation.verification import (
    VerificationCallback,
    evaluate_embeddings,
    evaluate_pairs,
    read_pairs_list,
)


def _reference_accuracy(emb1, emb2, issame, n_folds=10):
    """Plain loop: normalise, squared distance, best training threshold per fold."""
    e1 = emb1 / np.linalg.norm(emb1, axis=1, keepdims=True)
    e2 = emb2 / np.linalg.norm(emb2, axis=1, keepdims=True)
    dist = ((e1 - e2) ** 2).sum(1)
    thresholds = np.arange(0, 4, 0.01)
    accs = []
    for train, test in KFold(n_splits=n_folds, shuffle=False).split(np.arange(len(dist))):
        best_acc, best_thr = -1.0, None
        for thr in thresholds:
            acc = np.mean((dist[train] < thr) == issame[train])
            if acc > best_acc:
                best_acc, best_thr = acc, thr
        accs.append(np.mean((dist[test] < best_thr) == issame[test]))
    return np.mean(accs), np.std(accs)


def _pairs(n_pairs, dim=16, seed=0, noise=0.9):
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    a = rng.normal(size=(n_pairs, dim))
    b = np.where(issame[:, None], a + noise * rng.normal(size=a.shape), rng.normal(size=a.shape))
    emb = np.empty((2 * n_pairs, dim))
    emb[0::2], emb[1::2] = a * 3.0, b * 0.5  # raw norms differ: XNorm and normalisation matter
    return emb, issame


@pytest.mark.parametrize("n_pairs", [600, 605, 37])
def test_kfold_accuracy_equals_plain_loop(n_pairs):
    emb, issame = _pairs(n_pairs)
    got = kfold_accuracy(emb[0::2], emb[1::2], issame, n_folds=10)
    ref_mean, ref_std = _reference_accuracy(emb[0::2], emb[1::2], issame)
    assert got.mean == pytest.approx(ref_mean, abs=1e-12)
    assert got.std == pytest.approx(ref_std, abs=1e-12)
    assert 0.5 < got.mean < 1.0  # a non-trivial case


def test_kfold_perfectly_separable_is_one():
    emb, issame = _pairs(100, noise=0.0)
    assert kfold_accuracy(emb[0::2], emb[1::2], issame).mean == 1.0


def test_kfold_rejects_bad_shapes():
    emb, issame = _pairs(20)
    with pytest.raises(ValueError, match="shapes"):
        kfold_accuracy(emb[0::2], emb[1::2], issame[:-1])
    with pytest.raises(ValueError, match="n_folds"):
        kfold_accuracy(emb[0::2], emb[1::2], issame, n_folds=21)


def test_evaluate_embeddings_flip_and_xnorm():
    emb, issame = _pairs(200, seed=1)
    rng = np.random.default_rng(2)
    flipped = emb + 0.7 * rng.normal(size=emb.shape)
    res = evaluate_embeddings(emb, issame, flipped=flipped)
    fused = emb + flipped
    ref_flip = _reference_accuracy(fused[0::2], fused[1::2], issame)
    ref_plain = _reference_accuracy(emb[0::2], emb[1::2], issame)
    assert (res.accuracy, res.accuracy_std) == pytest.approx(ref_plain, abs=1e-12)
    assert (res.accuracy_flip, res.accuracy_flip_std) == pytest.approx(ref_flip, abs=1e-12)
    norms = [np.linalg.norm(v) for v in np.concatenate([emb, flipped])]
    assert res.xnorm == pytest.approx(sum(norms) / len(norms), rel=1e-12)
    assert res.num_pairs == 200


def _random_faces(n, seed=0, size=112):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_repeated_images_are_decoded_and_embedded_once(tmp_path):
    faces = _random_faces(4, seed=5, size=16)
    order = [0, 1, 0, 2, 1, 3, 3, 0]  # 8 slots, 4 distinct images
    encoded = [cv2.imencode(".png", f)[1].tobytes() for f in faces]
    path = tmp_path / "rep.bin"
    with open(path, "wb") as f:  # equal bytes in distinct objects, as a foreign writer makes them
        pickle.dump(([bytes(bytearray(encoded[i])) for i in order], [0, 1, 0, 1]), f)
    pairs = read_bin(path, image_size=(16, 16))
    for slot, i in enumerate(order):
        np.testing.assert_array_equal(pairs.images[slot], faces[i][:, :, ::-1].transpose(2, 0, 1))
    batches = []

    def embed(batch):  # a fixed function of the pixels
        batches.append(len(batch))
        return batch.reshape(len(batch), -1)[:, ::97].astype(np.float32) + 1.0

    got = evaluate_pairs(embed, pairs, n_folds=2)
    assert sum(batches) == 2 * 4  # each distinct image and its mirror, once
    e, f = embed(pairs.images), embed(np.ascontiguousarray(pairs.images[..., ::-1]))
    assert got == evaluate_embeddings(e, pairs.issame, flipped=f, n_folds=2)


def test_bin_round_trip_exact(tmp_path):
    faces = _random_faces(6)
    issame = [True, False, True]
    path = write_bin(tmp_path / "t.bin", faces, issame)
    got = read_bin(path)
    assert got.issame.tolist() == issame
    assert got.images.shape == (6, 3, 112, 112) and got.images.dtype == np.uint8
    for k, face in enumerate(faces):  # RGB HWC in, RGB CHW out, bit-exact (PNG)
        np.testing.assert_array_equal(got.images[k], face.transpose(2, 0, 1))


def _py2_pickle(bins, issame):
    """A pickle as Python 2 writes it: images as 8-bit ``str`` (BINSTRING), protocol 2."""
    out = bytearray(b"\x80\x02]q\x00(")  # PROTO 2, EMPTY_LIST, BINPUT, MARK
    for b in bins:
        out += b"T" + len(b).to_bytes(4, "little") + b
    out += b"e]q\x01("  # APPENDS, EMPTY_LIST, BINPUT, MARK
    out += b"".join(b"\x88" if s else b"\x89" for s in issame)  # NEWTRUE / NEWFALSE
    out += b"e\x86q\x02."  # APPENDS, TUPLE2, BINPUT, STOP
    return bytes(out)


def test_bin_python2_pickle_needs_bytes_encoding(tmp_path):
    faces = _random_faces(4, seed=3)
    bins = [cv2.imencode(".png", f[:, :, ::-1])[1].tobytes() for f in faces]
    path = tmp_path / "py2.bin"
    path.write_bytes(_py2_pickle(bins, [False, True]))
    with pytest.raises(UnicodeDecodeError):  # the case the reader must handle
        pickle.loads(path.read_bytes())
    got = read_bin(path)
    assert got.issame.tolist() == [False, True]
    for k, face in enumerate(faces):
        np.testing.assert_array_equal(got.images[k], face.transpose(2, 0, 1))


def test_bin_resizes_and_reports_bad_records(tmp_path):
    faces = _random_faces(2, size=120)
    got = read_bin(write_bin(tmp_path / "big.bin", faces, [True]))
    assert got.images.shape == (2, 3, 112, 112)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(pickle.dumps(([b"not an image", b"x"], [True])))
    with pytest.raises(ValueError, match=r"bad\.bin image #0"):
        read_bin(bad)
    uneven = tmp_path / "uneven.bin"
    uneven.write_bytes(pickle.dumps(([b"x"] * 3, [True])))
    with pytest.raises(ValueError, match=r"uneven\.bin: 3 images for 1 pairs"):
        read_bin(uneven)


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.bn = nn.BatchNorm1d(32)
        self.fc = nn.Linear(4 * 27 * 27, 32)

    def forward(self, x):
        return self.bn(self.fc(torch.relu(self.conv(x)).flatten(1)))


def _reference_embed(net, images):
    with torch.no_grad():
        x = (torch.from_numpy(images).float() / 255 - 0.5) / 0.5
        return net(x).numpy(), net(torch.flip(x, dims=[3])).numpy()


def test_callback_matches_independent_computation(tmp_path, caplog):
    faces = _random_faces(40, seed=5)
    issame = [bool(i % 2) for i in range(20)]
    write_bin(tmp_path / "t1.bin", faces, issame)
    net = _TinyNet()
    net.train()
    calls = []

    class Writer:
        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

    with caplog.at_level(logging.INFO, logger="otface.evaluation.verification"):
        cb = VerificationCallback(["t1", "absent"], tmp_path, summary_writer=Writer(), batch_size=7)
        out = cb(5, net)
    assert net.training  # train mode restored
    assert sum("absent" in r.getMessage() for r in caplog.records) == 1
    net.eval()
    e, f = _reference_embed(net, np.stack([x.transpose(2, 0, 1) for x in faces]))
    ref_acc, ref_std = _reference_accuracy((e + f)[0::2], (e + f)[1::2], np.array(issame))
    assert list(out) == ["t1"]
    assert out["t1"] == pytest.approx(ref_acc, abs=1e-9)
    assert calls == [("t1", out["t1"], 5)]
    text = caplog.text
    assert f"[t1][5]Accuracy-Flip: {ref_acc:1.5f}+-{ref_std:1.5f}" in text
    assert "[t1][5]XNorm: " in text and f"[t1][5]Accuracy-Highest: {ref_acc:1.5f}" in text
    net.eval()
    cb(6, net)
    assert not net.training  # eval mode kept when it was in eval mode


def test_pairs_list_mode(tmp_path):
    faces = _random_faces(4, seed=7)
    for k, face in enumerate(faces):
        cv2.imwrite(str(tmp_path / f"{k}.png"), face[:, :, ::-1])
    (tmp_path / "pairs.txt").write_text("# a b label\n0.png 1.png 1\n\n2.png 3.png 0\n")
    pairs = read_pairs_list(tmp_path / "pairs.txt")
    assert pairs.issame.tolist() == [True, False]
    np.testing.assert_array_equal(pairs.images[2], faces[2].transpose(2, 0, 1))
    net = _TinyNet().eval()
    res = evaluate_pairs(TorchEmbedder(net), pairs, n_folds=2)
    e, f = _reference_embed(net, pairs.images)
    assert res.accuracy_flip == pytest.approx(
        _reference_accuracy((e + f)[0::2], (e + f)[1::2], pairs.issame, n_folds=2)[0]
    )
    (tmp_path / "bad.txt").write_text("0.png 1.png 1\n0.png 1.png yes\n")
    with pytest.raises(ValueError, match=r"bad\.txt line 2"):
        read_pairs_list(tmp_path / "bad.txt")
    (tmp_path / "missing.txt").write_text("0.png 1.png 1\n0.png 9.png 0\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt line 2: .*9\.png"):
        read_pairs_list(tmp_path / "missing.txt")


def test_cli_on_model_pt(tmp_path, capsys):
    from otface.backbones import get_model

    torch.manual_seed(0)
    net = get_model("r18_lite").eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    faces = _random_faces(20, seed=9)
    issame = np.array([bool(i % 2) for i in range(10)])
    write_bin(tmp_path / "mini.bin", faces, issame)
    script = load_eval_script("verification")
    argv = ["--model", str(tmp_path / "model.pt"), "--network", "r18_lite", "--data"]
    rc = script.main(argv + [str(tmp_path), "--targets", "mini,lfw", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    e, f = _reference_embed(net, np.stack([x.transpose(2, 0, 1) for x in faces]))
    acc, std = _reference_accuracy((e + f)[0::2], (e + f)[1::2], issame)
    assert f"[mini]Accuracy-Flip: {acc:1.5f}+-{std:1.5f}" in out
    assert "[lfw] skipped" in out
    assert script.main(["--model", str(tmp_path / "model.pt"), "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err  # no training.log next to the model: the valid names
    assert "pass --network, one of r18, r34, r50, r100, r200, " in err
    assert all(f" {name}," in err or err.rstrip().endswith(name) for name in ("mbf", "r18_lite"))


def test_callback_unwraps_data_parallel(tmp_path):
    write_bin(tmp_path / "t2.bin", _random_faces(8, seed=8), [True, False, True, False])
    net = _TinyNet().train()
    wrapped = nn.DataParallel(net)
    out = VerificationCallback(["t2"], tmp_path)(1, wrapped)
    assert set(out) == {"t2"} and 0.0 <= out["t2"] <= 1.0
    assert net.training and wrapped.training
    assert VerificationCallback(["none"], tmp_path)(1, net) == {}


SMALL_DEMO = dict(
    train_identities=2,
    images_per_identity=1,
    val_identities=4,
    val_images_per_identity=3,
    val_pairs=20,
    hard_identities=2,
    hard_images_per_identity=2,
    hard_pairs=2,
    ijb_identities=2,
    ijb_images_per_identity=2,
    ijb_impostor_pairs=1,
)
TRAINING_LOG = """\
Training: 2024-05-01 10:00:00,001-: loss                     otface
Training: 2024-05-01 10:00:00,001-: network                  r50
Training: 2024-05-01 10:00:09,000-Speed 120.00 samples/sec   Loss 41.2000   LearningRate 0.1000
Training: 2024-05-01 11:00:00,001-: loss                     otface
Training: 2024-05-01 11:00:00,001-: network                  r18_lite
Training: 2024-05-01 11:00:00,002-: embedding_size           512
"""  # a second run into the same folder appends its own dump: the last one is the model's
EXTRA_FACES = _random_faces(8, seed=11)
EXTRA_ISSAME = [True, False, False, True]


@pytest.fixture(scope="module")
def _demo_cache(tmp_path_factory):
    """A cache folder holding a small demo set (built by the real ensure_demo) plus extra.bin."""
    from otface.demo import generate as demo

    root = tmp_path_factory.mktemp("otface_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "generate_demo", functools.partial(demo.generate_demo, **SMALL_DEMO))
        folder = demo.ensure_demo(root)
    write_bin(folder / "extra.bin", EXTRA_FACES, EXTRA_ISSAME)
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


def _run_dir(path):
    """A training output folder: an r18_lite model.pt and its training.log; returns the net."""
    from otface.backbones import get_model

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = get_model("r18_lite").eval()
    torch.save(net.state_dict(), path / "model.pt")
    (path / "training.log").write_text(TRAINING_LOG)
    return net


def test_cli_data_demo_defaults(tmp_path, demo_env, capsys):
    net = _run_dir(tmp_path / "demo_otface")
    script = load_eval_script("verification")
    # no --network (the log's last dump says r18_lite), no --targets (every .bin of the demo)
    argv = ["--model", str(tmp_path / "demo_otface" / "model.pt"), "--data", "demo"]
    assert script.main(argv + ["--device", "cpu", "--nfolds", "2"]) == 0
    out = capsys.readouterr().out
    demo_pairs = pickle.loads((demo_env / "demo_lfw.bin").read_bytes())
    demo_images = np.stack(
        [cv2.imdecode(np.frombuffer(b, np.uint8), 1)[:, :, ::-1].transpose(2, 0, 1)
         for b in demo_pairs[0]]
    )  # fmt: skip
    extra_images = np.stack([x.transpose(2, 0, 1) for x in EXTRA_FACES])
    for name, images, issame in [
        ("demo_lfw", demo_images, np.array(demo_pairs[1])),
        ("extra", extra_images, np.array(EXTRA_ISSAME)),
    ]:
        e, f = _reference_embed(net, images)
        acc, std = _reference_accuracy((e + f)[0::2], (e + f)[1::2], issame, n_folds=2)
        assert f"[{name}]Accuracy-Flip: {acc:1.5f}+-{std:1.5f}" in out
    assert "skipped" not in out
    # an explicit --network wins over the log
    assert script.main(argv + ["--network", "r50", "--device", "cpu"]) == 1
    assert "does not match --network 'r50'" in error_line(capsys)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_data", r"--data \S*nowhere does not exist \(pass a data folder, or 'demo'"),
        ("data_is_a_file", r"--data \S*model\.pt is a file, not a folder"),
        ("missing_targets", r"none of lfw, cpl found as \.bin in .*; \.bin sets there: "
         r"demo_crop, demo_hard, demo_lfw, demo_mask, extra \(pass --targets "
         r"demo_crop,demo_hard,demo_lfw,demo_mask,extra\)"),
        ("missing_model", r"model file \S*nope\.pt does not exist"),
        ("missing_model_no_log", r"model file \S*other/nope\.pt does not exist"),
        ("unknown_network", "unknown network 'banana'; valid: r18, .*r18_lite"),
        ("device", "--device 'cuda:99'"),
        ("bad_device", "--device 'banana' is not a torch device; valid: cpu, cuda"),
        ("broken_onnx", r"cannot load \S*broken\.onnx as an ONNX model"),
        ("missing_pairs", r"pairs list \S*nope\.txt does not exist"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_error_line(tmp_path, demo_env, capsys, case, expected):
    _run_dir(tmp_path)
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    model = ["--model", str(tmp_path / "model.pt")]
    argv = {
        "missing_data": model + ["--data", str(tmp_path / "nowhere")],
        "data_is_a_file": model + ["--data", str(tmp_path / "model.pt")],
        "missing_targets": model + ["--data", str(demo_env), "--targets", "lfw,cpl"],
        "missing_model": ["--model", str(tmp_path / "nope.pt"), "--data", "demo"],
        "missing_model_no_log": ["--model", str(tmp_path / "other" / "nope.pt"), "--data", "demo"],
        "unknown_network": model + ["--data", "demo", "--network", "banana"],
        "device": model + ["--data", "demo", "--device", "cuda:99"],
        "bad_device": model + ["--data", "demo", "--device", "banana"],
        "broken_onnx": ["--model", str(tmp_path / "broken.onnx"), "--data", "demo"],
        "missing_pairs": model + ["--pairs", str(tmp_path / "nope.txt")],
    }[case]
    if "--device" not in argv:
        argv += ["--device", "cpu"]
    assert load_eval_script("verification").main(argv) == 1
    assert re.search(expected, error_line(capsys))


def test_cli_batch_size_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        load_eval_script("verification").main(
            ["--model", "m.pt", "--data", "d", "--batch-size", "0"]
        )
    assert exc.value.code == 2
    assert "--batch-size: must be >= 1, got 0" in capsys.readouterr().err
