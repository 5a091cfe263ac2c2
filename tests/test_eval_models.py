"""Tests for the inputs of the evaluation command lines: otface.evaluation.models
(network from training.log, device check), bin_io.list_bin_sets and data_dirs.

References: log lines in the format arcface_torch writes (``Training: %(asctime)s-%(message)s``
with ``": " + key.ljust(25) + value``), folders the tests lay out themselves.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from otface.evaluation.bin_io import list_bin_sets
from otface.evaluation.data_dirs import is_demo, resolve_data_dir
from otface.evaluation.models import (
    load_state_into,
    network_from_training_log,
    resolve_device,
    resolve_network,
    state_differences,
    state_shapes,
)


def _dump(stamp: str, items: dict) -> str:
    return "".join(f"Training: {stamp}-: {k.ljust(25)}{v}\n" for k, v in items.items())


def test_network_from_training_log(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    assert network_from_training_log(model) is None  # no log
    log = tmp_path / "training.log"
    log.write_text(
        _dump("2024-05-01 10:00:00,001", {"network_fc": "r34", "networks": "r50"})
        + "Training: 2024-05-01 10:00:09,000-Speed 120.00 samples/sec   network r100\n"
    )
    assert network_from_training_log(model) is None  # other keys and free text do not count
    log.write_text(
        _dump("2024-05-01 10:00:00,001", {"loss": "otface", "network": "r100", "lr": 0.1})
        + "Training: 2024-05-01 10:00:09,000-Speed 120.00 samples/sec   Loss 41.2\n"
        + _dump("2024-05-02 08:00:00,001", {"network": "mbf"}).replace("\n", "\r\n")
    )
    assert network_from_training_log(model) == "mbf"  # the last dump, CRLF or not
    assert network_from_training_log(tmp_path) == "mbf"  # the output folder itself


def test_resolve_network(tmp_path):
    (tmp_path / "training.log").write_text(_dump("2024-05-01 10:00:00,001", {"network": "r50"}))
    assert resolve_network(tmp_path / "model.pt", None) == "r50"
    assert resolve_network(tmp_path / "model.pt", "r100") == "r100"  # explicit wins
    assert resolve_network(tmp_path / "model.onnx", None) is None  # ONNX carries its graph
    assert resolve_network(tmp_path / "elsewhere" / "model.pt", None) is None


def test_state_differences_and_load_state_into():
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    assert state_shapes(net)["0.weight"] == (3, 4)
    assert state_differences(state_shapes(net), state_shapes(net.state_dict())) == []
    state = dict(net.state_dict())
    state["0.weight"] = torch.zeros(2, 4)
    del state["1.bias"]
    state["2.weight"] = torch.zeros(1)
    # The network's key order, then the file's extra keys.
    assert state_differences(state_shapes(net), state_shapes(state)) == [
        "'0.weight' is (2, 4) in the file, (3, 4) in the network",
        "'1.bias' is missing from the file",
        "'2.weight' is in the file but not in the network",
    ]
    with pytest.raises(ValueError, match=r"^m\.pt does not match --network 'tiny': 3 differing"):
        load_state_into(net, state, network="tiny", source="m.pt")
    other = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    assert load_state_into(net, other.state_dict(), network="tiny") is net
    assert torch.equal(net[0].weight, other[0].weight)


def test_resolve_device():
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="'banana' is not a torch device; valid: cpu, cuda"):
        resolve_device("banana")
    with pytest.raises(ValueError, match="--device 'cuda:99'"):
        resolve_device("cuda:99")


def test_list_bin_sets(tmp_path):
    assert list_bin_sets(tmp_path / "nowhere") == []
    for name in ("lfw.bin", "agedb_30.bin", "notes.txt", "cfp_fp.bin.tmp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder.bin").mkdir()
    assert list_bin_sets(tmp_path) == ["agedb_30", "lfw"]


def test_resolve_data_dir_keyword_and_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert is_demo("demo") and not is_demo("./demo") and not is_demo(tmp_path / "demo")
    assert resolve_data_dir("./demo").resolve() == (tmp_path / "demo").resolve()
    with pytest.raises(FileNotFoundError, match=r"--data \S*nowhere does not exist"):
        resolve_data_dir(tmp_path / "nowhere")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        resolve_data_dir(tmp_path / "file")
    # the keyword: ensure_demo under $OTFACE_CACHE, here a folder already marked complete
    from otface.demo import generate as demo

    built = []

    def fake_generate(out, seed, train_occlusion_p=None):
        built.append(seed)
        Path(out, "demo_lfw.bin").parent.mkdir(parents=True)
        return Path(out)

    monkeypatch.setenv("OTFACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "generate_demo", fake_generate)
    expected = tmp_path / "cache" / f"demo_v{demo.FORMAT_VERSION}_seed0"
    assert resolve_data_dir("demo", subdir="ijb") == expected / "ijb"
    assert resolve_data_dir("demo") == expected
    assert built == [0]  # built once (seed 0, as training's rec="demo"), then found in the cache


def test_onnx_embedder_fixed_shapes(tmp_path):
    pytest.importorskip("onnxruntime")
    from otface.evaluation.models import OnnxEmbedder

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    path = tmp_path / "m128.onnx"
    torch.onnx.export(
        net, (torch.zeros(2, 3, 128, 128),), str(path), input_names=["data"], dynamo=False
    )  # a model for 128×128 faces with its batch axis fixed at 2
    embedder = OnnxEmbedder(path)
    faces = np.random.default_rng(0).integers(0, 256, (3, 3, 128, 128), dtype=np.uint8)
    x = (torch.from_numpy(faces).float() / 255 - 0.5) / 0.5
    with torch.no_grad():  # one face at a time, so no batch can influence another
        ref = np.concatenate([net(x[k : k + 1]).numpy() for k in range(len(x))])
    np.testing.assert_allclose(embedder(faces), ref, atol=1e-5)  # 3 faces: batches of 2 and 1
    with pytest.raises(ValueError, match=r"m128\.onnx takes input \(3, 128, 128\) per face, "):
        embedder(np.zeros((2, 3, 112, 112), np.uint8))
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match=r"cannot load \S*broken\.onnx as an ONNX model"):
        OnnxEmbedder(tmp_path / "broken.onnx")
