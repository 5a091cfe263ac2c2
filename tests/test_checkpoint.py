import os

import pytest
import torch

from otface.train.checkpoint import CheckpointError, atomic_save, load_checkpoint


class _Explodes:
    def __reduce__(self):
        raise RuntimeError("killed mid-save")


def test_interrupted_save_keeps_previous_file(tmp_path):
    path = tmp_path / "model.pt"
    atomic_save({"w": torch.ones(3)}, str(path))
    with pytest.raises(RuntimeError, match="mid-save"):
        atomic_save({"w": torch.zeros(3), "bad": _Explodes()}, str(path))
    assert torch.equal(torch.load(path)["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # no temporary file left behind


def test_missing_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(tmp_path / "checkpoint_gpu_0.pt"))
    assert "checkpoint_gpu_0.pt" in str(info.value) and "save_all_states" in str(info.value)


def test_truncated_checkpoint_names_file(tmp_path):
    path = tmp_path / "checkpoint_gpu_0.pt"
    atomic_save({"epoch": 1}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checkpoint_gpu_0.pt"):
        load_checkpoint(str(path))


def test_model_state_dict_is_not_a_training_checkpoint(tmp_path):
    path = tmp_path / "checkpoint_gpu_0.pt"
    atomic_save({"conv1.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(str(path))
