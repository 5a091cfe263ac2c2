import errno
import hashlib
import logging
import os

import pytest
import torch

from otface.train import integrity
from otface.train.checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    load_latest_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)


class _Explodes:
    def __reduce__(self):
        raise RuntimeError("killed mid-save")


def _state(step: int) -> dict:
    """An arcface_torch-shaped checkpoint dict of small tensors, distinct for each ``step``."""
    g = torch.Generator().manual_seed(step)
    return {
        "epoch": step // 10,
        "global_step": step,
        "state_dict_backbone": {"w": torch.randn(64, 256, generator=g)},  # 64 KiB of data
        "state_dict_softmax_fc": {"weight": torch.randn(8, 4, generator=g)},
        "state_optimizer": {"state": {}, "param_groups": []},
        "state_lr_scheduler": {"last_epoch": step},
    }


def _same(a: dict, b: dict) -> bool:
    return (
        a["global_step"] == b["global_step"]
        and torch.equal(a["state_dict_backbone"]["w"], b["state_dict_backbone"]["w"])
        and torch.equal(a["state_dict_softmax_fc"]["weight"], b["state_dict_softmax_fc"]["weight"])
    )


def _corrupt_middle(path, n_bytes: int = 256) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n_bytes] = bytes((b ^ 0x5A) for b in data[mid : mid + n_bytes])
    path.write_bytes(bytes(data))


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# -- atomic_save / load_checkpoint (single files) -------------------------------------------------
def test_interrupted_save_keeps_previous_file(tmp_path):
    path = tmp_path / "model.pt"
    atomic_save({"w": torch.ones(3)}, str(path))
    with pytest.raises(RuntimeError, match="mid-save"):
        atomic_save({"w": torch.zeros(3), "bad": _Explodes()}, str(path))
    assert torch.equal(torch.load(path)["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # no temporary file left behind


def test_atomic_save_digest_is_that_of_the_file(tmp_path):
    path = tmp_path / "model.pt"
    digest = atomic_save({"w": torch.arange(1000.0)}, str(path))
    data = path.read_bytes()
    assert digest == (hashlib.sha256(data).hexdigest(), len(data))


def test_missing_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(tmp_path / "checkpoint_gpu_0.pt"))
    assert "checkpoint_gpu_0.pt" in str(info.value) and "save_all_states" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_latest_checkpoint(str(tmp_path), 0)
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


# -- checksums and rotation -----------------------------------------------------------------------
def test_rotation_keeps_exactly_two_with_checksums(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(_state(step), str(tmp_path), 0)
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint_gpu_0.prev.pt",
        "checkpoint_gpu_0.prev.pt.sha256",
        "checkpoint_gpu_0.pt",
        "checkpoint_gpu_0.pt.sha256",
    ]
    for name, step in (("checkpoint_gpu_0.pt", 3), ("checkpoint_gpu_0.prev.pt", 2)):
        data = (tmp_path / name).read_bytes()
        # arcface_torch reads it with a plain torch.load
        assert _same(torch.load(tmp_path / name, weights_only=False), _state(step))
        recorded = (tmp_path / (name + ".sha256")).read_text().split()
        assert recorded[:2] == [hashlib.sha256(data).hexdigest(), str(len(data))]
        # The third field checks the first two: SHA-256 of "<digest>  <size>", 16 hex digits.
        own = hashlib.sha256(f"{recorded[0]}  {recorded[1]}".encode()).hexdigest()[:16]
        assert recorded[2] == own


@pytest.mark.parametrize("damage", ["overwrite", "truncate"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, caplog, damage):
    save_checkpoint(_state(1), str(tmp_path), 0)
    save_checkpoint(_state(2), str(tmp_path), 0)
    newest = tmp_path / "checkpoint_gpu_0.pt"
    if damage == "overwrite":
        _corrupt_middle(newest)
        # the damage is silent to torch.load: it reads garbage weights without complaint
        assert not _same(torch.load(newest, weights_only=False), _state(2))
    else:
        newest.write_bytes(newest.read_bytes()[:-1000])
    with caplog.at_level(logging.WARNING):
        state, path = load_latest_checkpoint(str(tmp_path), 0)
    assert path == str(tmp_path / "checkpoint_gpu_0.prev.pt")
    assert _same(state, _state(1))
    warned = _warnings(caplog)
    assert str(newest) in warned and "corrupt" in warned
    assert ("SHA-256" if damage == "overwrite" else "bytes but") in warned
    # moved aside, so the next save keeps the good one as .prev
    assert (tmp_path / "checkpoint_gpu_0.pt.corrupt").exists() and not newest.exists()
    save_checkpoint(_state(3), str(tmp_path), 0)
    assert _same(torch.load(tmp_path / "checkpoint_gpu_0.prev.pt", weights_only=False), _state(1))
    assert _same(load_latest_checkpoint(str(tmp_path), 0).state, _state(3))


def test_both_corrupt_raises_naming_both(tmp_path):
    save_checkpoint(_state(1), str(tmp_path), 0)
    save_checkpoint(_state(2), str(tmp_path), 0)
    _corrupt_middle(tmp_path / "checkpoint_gpu_0.pt")
    _corrupt_middle(tmp_path / "checkpoint_gpu_0.prev.pt")
    with pytest.raises(CheckpointError) as info:
        load_latest_checkpoint(str(tmp_path), 0)
    msg = str(info.value)
    assert str(tmp_path / "checkpoint_gpu_0.pt") in msg
    assert str(tmp_path / "checkpoint_gpu_0.prev.pt") in msg
    assert msg.count("SHA-256") == 2 and "\n" not in msg


def test_global_step_selects_the_previous_without_quarantine(tmp_path):
    save_checkpoint(_state(1), str(tmp_path), 0)
    save_checkpoint(_state(2), str(tmp_path), 0)
    state, path = load_latest_checkpoint(str(tmp_path), 0, global_step=1)
    assert path.endswith("checkpoint_gpu_0.prev.pt") and _same(state, _state(1))
    assert (tmp_path / "checkpoint_gpu_0.pt").exists()
    with pytest.raises(CheckpointError, match="not 7"):
        load_latest_checkpoint(str(tmp_path), 0, global_step=7)


def test_legacy_checkpoint_without_checksum_loads_with_warning(tmp_path, caplog):
    legacy = tmp_path / "checkpoint_gpu_0.pt"
    torch.save(_state(5), legacy)  # as arcface_torch writes it: no sidecar
    with caplog.at_level(logging.WARNING):
        state, path = load_latest_checkpoint(str(tmp_path), 0)
    assert path == str(legacy) and _same(state, _state(5))
    assert str(legacy) in _warnings(caplog) and "cannot be verified" in _warnings(caplog)
    # a verified save rotates it to .prev, where it is still accepted
    save_checkpoint(_state(6), str(tmp_path), 0)
    assert not (tmp_path / "checkpoint_gpu_0.prev.pt.sha256").exists()
    _corrupt_middle(tmp_path / "checkpoint_gpu_0.pt")
    state, path = load_latest_checkpoint(str(tmp_path), 0)
    assert path.endswith("checkpoint_gpu_0.prev.pt") and _same(state, _state(5))


# -- interruptions --------------------------------------------------------------------------------
def test_exception_mid_torch_save_keeps_previous_and_no_temp(tmp_path):
    save_checkpoint(_state(1), str(tmp_path), 0)
    save_checkpoint(_state(2), str(tmp_path), 0)
    before = sorted(os.listdir(tmp_path))
    bad = dict(_state(3), state_lr_scheduler={"boom": _Explodes()})
    with pytest.raises(RuntimeError, match="mid-save"):
        save_checkpoint(bad, str(tmp_path), 0)
    assert sorted(os.listdir(tmp_path)) == before
    state, path = load_latest_checkpoint(str(tmp_path), 0)
    assert path.endswith("checkpoint_gpu_0.pt") and _same(state, _state(2))


def test_kill_between_any_two_renames_leaves_a_verified_checkpoint(tmp_path, monkeypatch, caplog):
    real_replace = os.replace
    n_renames = 0
    for kill_at in range(8):
        out = tmp_path / str(kill_at)
        save_checkpoint(_state(1), str(out), 0)
        save_checkpoint(_state(2), str(out), 0)
        calls = []

        def replace(src, dst, calls=calls, kill_at=kill_at):
            if len(calls) == kill_at:
                raise KeyboardInterrupt
            calls.append(dst)
            real_replace(src, dst)

        monkeypatch.setattr(integrity.os, "replace", replace)
        caplog.clear()
        try:
            save_checkpoint(_state(3), str(out), 0)
            n_renames = len(calls)
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(integrity.os, "replace", real_replace)
        with caplog.at_level(logging.WARNING):
            state, _ = load_latest_checkpoint(str(out), 0)
        assert state["global_step"] in (2, 3)
        assert _same(state, _state(state["global_step"]))
        assert "corrupt" not in _warnings(caplog) and "cannot be verified" not in _warnings(caplog)
    assert 0 < n_renames < 8  # every rename of a save was interrupted once


# -- stale temp files -----------------------------------------------------------------------------
def test_stale_temp_cleanup_removes_only_matching(tmp_path, monkeypatch):
    # a save killed hard (no cleanup runs) leaves its temp file behind
    monkeypatch.setattr(integrity, "unlink_quietly", lambda path: None)
    with pytest.raises(RuntimeError):
        save_checkpoint({"bad": _Explodes()}, str(tmp_path), 1)
    (left,) = os.listdir(tmp_path)
    monkeypatch.undo()
    planted = [
        ".checkpoint_gpu_0.pt.k2j4_x9q.tmp",
        ".checkpoint_gpu_0.pt.sha256.a1b2c3d4.tmp",
        ".model.pt.zzzz9999.tmp",
    ]
    kept = [
        "checkpoint_gpu_0.pt",
        "notes.tmp",
        ".checkpoint_gpu_0.pt.tmp",
        ".checkpoint_gpu_x.pt.abcdefgh.tmp",
        ".other.pt.abcdefgh.tmp",
        ".checkpoint_gpu_0.pt.abcdefgh.tmp.keep",
        "checkpoint_gpu_0.pt.abcdefgh.tmp",
    ]
    for name in planted + kept:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".checkpoint_gpu_2.pt.abcdefgh.tmp").mkdir()
    assert remove_stale_temp_files(str(tmp_path), rank=1) == [str(tmp_path / left)]
    removed = remove_stale_temp_files(str(tmp_path))
    assert removed == sorted(str(tmp_path / n) for n in planted)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + [".checkpoint_gpu_2.pt.abcdefgh.tmp"])
    assert remove_stale_temp_files(str(tmp_path / "missing")) == []


# -- write errors ---------------------------------------------------------------------------------
class _FullDisk:
    """A file whose device fills up after ``room`` bytes."""

    def __init__(self, raw, room):
        self._raw, self._room = raw, room

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._raw.write(data)

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()


@pytest.mark.parametrize("room", [0, 2000])
def test_full_disk_names_file_and_keeps_old_checkpoints(tmp_path, monkeypatch, room):
    save_checkpoint(_state(1), str(tmp_path), 0)
    save_checkpoint(_state(2), str(tmp_path), 0)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    real_fdopen = os.fdopen
    monkeypatch.setattr(
        integrity.os, "fdopen", lambda *a, **k: _FullDisk(real_fdopen(*a, **k), room)
    )
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(_state(3), str(tmp_path), 0)
    with pytest.raises(CheckpointError, match=r"model\.pt: No space left on device"):
        atomic_save({"w": torch.ones(4096)}, str(tmp_path / "model.pt"))
    monkeypatch.undo()
    msg = str(info.value)
    assert str(tmp_path / "checkpoint_gpu_0.pt") in msg and "No space left on device" in msg
    assert "\n" not in msg
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    assert _same(load_latest_checkpoint(str(tmp_path), 0).state, _state(2))


def test_unwritable_folder_names_file(tmp_path, monkeypatch):
    def mkstemp(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

    monkeypatch.setattr(integrity.tempfile, "mkstemp", mkstemp)
    with pytest.raises(CheckpointError, match=r"checkpoint_gpu_3\.pt: Permission denied"):
        save_checkpoint(_state(1), str(tmp_path), 3)


@pytest.mark.parametrize("damage", ["wrong_hash", "garbled"])
def test_damaged_sidecar_does_not_condemn_a_good_checkpoint(tmp_path, caplog, damage):
    # A wrong hash in the sidecar (its own check then fails), or bytes that do not parse:
    # the newest checkpoint is still the one loaded, with a warning, not set aside.
    save_checkpoint(_state(1), str(tmp_path), 0)
    save_checkpoint(_state(2), str(tmp_path), 0)
    sidecar = tmp_path / "checkpoint_gpu_0.pt.sha256"
    fields = sidecar.read_text().split()
    if damage == "wrong_hash":
        fields[0] = ("0" if fields[0][0] != "0" else "1") + fields[0][1:]
        sidecar.write_text("  ".join(fields) + "\n")
    else:
        sidecar.write_bytes(b"\x00\xff" * 20)
    with caplog.at_level(logging.WARNING):
        ckpt, path = load_latest_checkpoint(str(tmp_path), 0)
    assert path.endswith("checkpoint_gpu_0.pt") and ckpt["global_step"] == 2
    assert "damaged" in caplog.text and "without verification" in caplog.text
    assert not list(tmp_path.glob("*.corrupt*"))


# -- run ids ---------------------------------------------------------------------------------------
def _run_state(step: int, run_id: str | None) -> dict:
    state = _state(step)
    if run_id is not None:
        state["run_id"] = run_id
    return state


def test_the_run_id_is_in_the_checkpoint_and_its_sidecar(tmp_path):
    save_checkpoint(_run_state(4, "run-a"), str(tmp_path), 0)
    path = str(tmp_path / "checkpoint_gpu_0.pt")
    assert integrity.sidecar_run_id(path) == "run-a"
    assert torch.load(path, weights_only=False)["run_id"] == "run-a"
    # The id is covered by the sidecar's own check: an edited id makes it damaged.
    sidecar = tmp_path / "checkpoint_gpu_0.pt.sha256"
    sidecar.write_text(sidecar.read_text().replace("run-a", "run-b"))
    assert integrity.sidecar_run_id(path) is None


def test_another_runs_checkpoint_is_never_a_fallback(tmp_path, caplog):
    out = str(tmp_path)
    save_checkpoint(_run_state(8, "old-run"), out, 0)  # the replaced run's, now .prev
    save_checkpoint(_run_state(2, "new-run"), out, 0)
    loaded = load_latest_checkpoint(out, 0, run_id="new-run")
    assert loaded.state["global_step"] == 2
    newest = tmp_path / "checkpoint_gpu_0.pt"
    os.truncate(newest, newest.stat().st_size // 2)
    with pytest.raises(CheckpointError) as err:
        load_latest_checkpoint(out, 0, run_id="new-run")
    message = str(err.value)
    assert "no usable checkpoint of run new-run" in message
    assert "corrupt" in message
    assert "checkpoint_gpu_0.prev.pt: belongs to another run (old-run)" in message
    assert "at global step 8" in message
    assert "resuming from" not in caplog.text


def test_the_run_id_of_the_file_itself_is_checked_without_a_sidecar(tmp_path):
    out = str(tmp_path)
    save_checkpoint(_run_state(8, "old-run"), out, 0)
    os.unlink(tmp_path / "checkpoint_gpu_0.pt.sha256")  # e.g. copied in without it
    with pytest.raises(CheckpointError, match=r"belongs to another run \(old-run\)"):
        load_latest_checkpoint(out, 0, run_id="new-run")


def test_a_checkpoint_from_before_run_ids_is_taken(tmp_path):
    save_checkpoint(_run_state(8, None), str(tmp_path), 0)
    assert integrity.sidecar_run_id(str(tmp_path / "checkpoint_gpu_0.pt")) is None
    loaded = load_latest_checkpoint(str(tmp_path), 0, run_id="new-run")
    assert loaded.state["global_step"] == 8


def test_a_damaged_sidecar_is_warned_about_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    save_checkpoint(_run_state(3, "run-a"), str(tmp_path), 0)
    (tmp_path / "checkpoint_gpu_0.pt.sha256").write_text("not a checksum\n")
    loaded = load_latest_checkpoint(str(tmp_path), 0)
    assert loaded.state["global_step"] == 3
    warnings = _warnings(caplog).splitlines()
    assert len(warnings) == 1 and "is damaged" in warnings[0], warnings
