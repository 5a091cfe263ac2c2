"""Tests for otface.export: ONNX graph contract, parity with PyTorch, insightface loading.

References: onnxruntime and insightface's own loaders (``model_zoo.get_model`` on the bare
file and on the package) fed BGR faces, compared with our PyTorch embedding of the RGB face.
"""

import hashlib
import importlib.util
import json
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _scripts import load_eval_script

import otface.export as export_mod
from otface.backbones import get_model
from otface.evaluation.models import TorchEmbedder, load_backbone
from otface.export import ExportParityError, check_onnx_parity, export_model

HAS_INSIGHTFACE = importlib.util.find_spec("insightface") is not None


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _faces_bgr(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(n)]


def _save(tmp_path, network, seed=0):
    torch.manual_seed(seed)
    net = get_model(network).eval()
    with torch.no_grad():  # keep activations O(1) through deep random nets
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                m.weight.mul_(0.5)
    work = tmp_path / f"work_{network}"
    work.mkdir()
    torch.save(net.state_dict(), work / "model.pt")
    return work


def _check_export(work, network, *, batches=(1, 7)):
    result = export_model(work, network=network)
    assert result.onnx_path == work / "model.onnx" and result.min_cosine >= 0.9999
    model = onnx.load(str(result.onnx_path))
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "data"
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 112, 112]
    assert len(model.graph.output) == 1
    backbone = load_backbone(work / "model.pt", network)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    for n in batches:  # a real dynamic batch axis
        faces = np.stack([f[:, :, ::-1].transpose(2, 0, 1) for f in _faces_bgr(n, seed=n)])
        x = ((faces.astype(np.float32) / 255 - 0.5) / 0.5).astype(np.float32)
        out = session.run(None, {"data": x})[0]
        assert out.shape == (n, 512)
        assert _cos(out, TorchEmbedder(backbone)(faces)).min() >= 0.9999
    return result, backbone


def _check_insightface(result, backbone, n_faces=7):
    from insightface.model_zoo import get_model as if_get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    faces = _faces_bgr(n_faces, seed=11)  # insightface takes aligned BGR faces
    ours = TorchEmbedder(backbone)(np.stack([f[:, :, ::-1].transpose(2, 0, 1) for f in faces]))
    cpu = ["CPUExecutionProvider"]
    bare = if_get_model(str(result.onnx_path), providers=cpu)
    assert isinstance(bare, ArcFaceONNX)
    assert _cos(bare.get_feat(faces), ours).min() >= 0.9999
    assert _cos(bare.get_feat(faces[0]), ours[:1]).min() >= 0.9999  # batch of 1
    package = if_get_model(str(result.package_dir), model_task="recognition", providers=cpu)
    assert isinstance(package, ArcFaceONNX)
    assert _cos(package.get_feat(faces), ours).min() >= 0.9999
    manifest = json.loads((result.package_dir / "manifest.json").read_text())
    task = manifest["tasks"]["recognition"]
    assert manifest["manifest_version"] == 2
    digest = hashlib.sha256((result.package_dir / task["file"]).read_bytes()).hexdigest()
    assert task["sha256"] == digest
    assert task["preprocessing"] == {"mean": 127.5, "std": 127.5}
    assert task["input_size"] == [112, 112] and task["embedding_dimension"] == 512


def test_package_holds_every_file_its_manifest_names(tmp_path):
    result = export_model(_save(tmp_path, "r18_lite"), network="r18_lite")
    manifest = json.loads((result.package_dir / "manifest.json").read_text())
    named = [manifest["license"]] + [t["file"] for t in manifest["tasks"].values()]
    for name in named:
        assert (result.package_dir / name).is_file(), name
    assert "No license has been chosen" in (result.package_dir / "MODEL.LICENSE").read_text()


def test_export_reads_the_network_from_training_log(tmp_path, capsys):
    from otface.export import main as export_main

    work = _save(tmp_path, "r18_lite")
    (work / "training.log").write_text("Training: 2026-01-01 00:00:00,000-: network   r18_lite\n")
    assert export_main([str(work), "--no-package"]) == 0
    assert (work / "model.onnx").is_file()
    (work / "training.log").unlink()
    assert export_main([str(work), "--no-package"]) == 1
    assert "give --network" in capsys.readouterr().err


def test_export_r18_lite(tmp_path):
    result, backbone = _check_export(_save(tmp_path, "r18_lite"), "r18_lite")
    if HAS_INSIGHTFACE:
        _check_insightface(result, backbone)


@pytest.mark.slow
def test_export_r50(tmp_path):
    work = _save(tmp_path, "r50")
    start = time.perf_counter()
    # export_model itself checks batches 1 and 7 against PyTorch; keep the rest small.
    result, backbone = _check_export(work, "r50", batches=())
    print(f"r50 export + parity check: {time.perf_counter() - start:.1f} s")
    if HAS_INSIGHTFACE:
        _check_insightface(result, backbone, n_faces=2)


def test_training_checkpoint_is_refused(tmp_path):
    net = get_model("r18_lite")
    ckpt = tmp_path / "checkpoint_gpu_0.pt"
    torch.save(
        {
            "epoch": 1,
            "global_step": 10,
            "state_dict_backbone": net.state_dict(),
            "state_dict_softmax_fc": {"weight": torch.zeros(4, 512)},
        },
        ckpt,
    )
    with pytest.raises(ValueError, match=r"checkpoint_gpu_0\.pt is a full training.*model\.pt"):
        export_model(ckpt, network="r18_lite")
    assert not (tmp_path / "model.onnx").exists()
    assert export_mod.main([str(ckpt), "--network", "r18_lite"]) == 1


def test_wrong_network_names_keys(tmp_path):
    work = _save(tmp_path, "r18_lite")
    with pytest.raises(ValueError, match=r"--network 'r18'.*differing keys.*e\.g\."):
        export_model(work, network="r18")
    with pytest.raises(FileNotFoundError, match="without model.pt"):
        export_model(tmp_path, network="r18")


def test_parity_failure_leaves_no_model(tmp_path, monkeypatch):
    work = _save(tmp_path, "r18_lite")

    def fail(*args, **kwargs):
        raise ExportParityError("differs")

    monkeypatch.setattr(export_mod, "check_onnx_parity", fail)
    with pytest.raises(ExportParityError):
        export_model(work, network="r18_lite", package=False)
    assert not (work / "model.onnx").exists()
    assert list(work.iterdir()) == [work / "model.pt"]


def test_parity_check_detects_a_different_model(tmp_path):
    work = _save(tmp_path, "r18_lite")
    onnx_path = export_model(work, network="r18_lite", package=False).onnx_path
    torch.manual_seed(1)
    other = get_model("r18_lite").eval()  # other weights, same graph
    with pytest.raises(ExportParityError, match="worst cosine"):
        check_onnx_parity(other, onnx_path, batch_sizes=(2,))


@pytest.mark.skipif(importlib.util.find_spec("onnxsim") is not None, reason="onnxsim installed")
def test_simplify_without_onnxsim_says_so(tmp_path):
    work = _save(tmp_path, "r18_lite")
    with pytest.raises(ImportError, match="pip install onnxsim"):
        export_model(work, network="r18_lite", simplify=True)


def test_onnx_embedder_handles_fixed_batch_models(tmp_path):
    from otface.evaluation.models import OnnxEmbedder

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 16)
    ).eval()
    path = tmp_path / "fixed.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False)
    faces = np.stack([f.transpose(2, 0, 1) for f in _faces_bgr(3)])
    embedder = OnnxEmbedder(path, batch_size=64)
    assert embedder.batch_size == 1
    np.testing.assert_allclose(embedder(faces), TorchEmbedder(net)(faces), rtol=1e-4, atol=1e-5)


def test_an_onnx_model_from_an_earlier_model_pt_is_refused(tmp_path):
    from otface.evaluation.models import open_embedder

    work = _save(tmp_path, "r18_lite")
    result = export_model(work, network="r18_lite", package=False)
    record = json.loads((work / "model.onnx.source.json").read_text())
    assert record["model"] == "model.pt"
    assert record["sha256"] == hashlib.sha256((work / "model.pt").read_bytes()).hexdigest()
    open_embedder(result.onnx_path)  # matches: opens
    torch.manual_seed(1)  # training went on: a new model.pt beside the old export
    torch.save(get_model("r18_lite").state_dict(), work / "model.pt")
    with pytest.raises(ValueError, match="exported from an earlier .*export again"):
        open_embedder(result.onnx_path)


@pytest.mark.slow
def test_export_vit_t(tmp_path):
    """The ViT exports with a dynamic batch, matches PyTorch, and insightface loads it."""
    result, backbone = _check_export(_save(tmp_path, "vit_t"), "vit_t", batches=(1, 3))
    if HAS_INSIGHTFACE:
        _check_insightface(result, backbone, n_faces=3)


def test_eval_commands_take_vit_t(tmp_path, tiny_demo, capsys):
    work = _save(tmp_path, "vit_t")
    scripts = {name: load_eval_script(name) for name in ("verification", "ijb")}
    common = ["--model", str(work / "model.pt"), "--network", "vit_t", "--device", "cpu"]
    targets = ["--data", str(tiny_demo), "--targets", "demo_lfw"]
    assert scripts["verification"].main(common + targets) == 0
    assert "[demo_lfw]Accuracy-Flip" in capsys.readouterr().out
    ijb = ["--data", str(tiny_demo / "ijb"), "--target", "demo", "--protocol", "all"]
    assert scripts["ijb"].main(common + ijb + ["--output", str(tmp_path / "ijb")]) == 0
    out = capsys.readouterr().out
    assert "1:1 verification" in out and "1:N identification" in out
