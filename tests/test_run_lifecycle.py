"""A run's life cycle on the command line: its id, ``--overwrite``, ``--resume``, a resume of a
finished run or of another run's files, a start that fails before its first step, and a
DataLoader worker that dies."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from _scripts import error_line
from _spawn import TRAIN_PY, run_train, start_train
from test_train_reliability import _config

from otface.config import load_config
from otface.train import loop, run
from otface.train.checkpoint import checkpoint_path, previous_checkpoint_path, save_checkpoint
from otface.train.identity import log_run_id, model_metadata
from otface.train.integrity import sidecar_run_id


class _Killed(KeyboardInterrupt):
    """Stands for a kill -9 right after a save: the files on disk are what a kill leaves."""


def _killed_after_first_save(monkeypatch, path, *, existing="refuse") -> None:
    """``run.main(path)``, stopped (exit 130) right after its first checkpoint is saved, as a
    kill -9 there would leave the files."""
    original = loop.Trainer.save_state

    def save_then_die(self, **kwargs):
        original(self, **kwargs)
        raise _Killed()

    with monkeypatch.context() as patch:
        patch.setattr(loop.Trainer, "save_state", save_then_die)
        assert run.main(path, existing=existing) == 130


def _files(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def _run_ids(out) -> set[str]:
    ids = set()
    for name in os.listdir(out):
        if re.fullmatch(r"checkpoint_gpu_\d+(\.prev)?\.pt", name):
            ids.add(torch.load(os.path.join(out, name), weights_only=False).get("run_id"))
    return ids


# -- §1: overwrite, kill, damage, resume -----------------------------------------------------------


@pytest.mark.slow
def test_overwrite_then_a_damaged_checkpoint_never_resumes_the_old_run(
    tmp_path, monkeypatch, capsys
):
    path, out = _config(tmp_path, num_image=64, num_epoch=1, save_every=3)
    assert run.main(path) == 0
    old_model = open(os.path.join(out, "model.pt"), "rb").read()
    old_id = log_run_id(os.path.join(out, "training.log"))
    # A new run replaces it (another seed and lr) and is killed after its first save.
    path, _ = _config(
        tmp_path,
        num_image=64,
        num_epoch=1,
        save_every=3,
        extra="config.seed = 7\nconfig.lr = 0.1\n",
    )
    _killed_after_first_save(monkeypatch, path, existing="overwrite")
    new_id = log_run_id(os.path.join(out, "training.log"))
    assert new_id and new_id != old_id
    # Nothing of the old run is left: its checkpoints (with .prev), log and events are gone.
    assert _run_ids(out) == {new_id}
    assert not os.path.exists(previous_checkpoint_path(out, 0))
    assert not os.path.exists(os.path.join(out, "model.pt"))
    assert open(os.path.join(out, "training.log")).read().count("==== run started") == 1
    assert os.listdir(os.path.join(out, "tensorboard")) == [new_id]
    assert not os.path.exists(os.path.join(out, ".replaced"))
    newest = checkpoint_path(out, 0)
    stray = torch.load(newest, weights_only=False)
    stray["run_id"] = old_id  # for below: a checkpoint of the old run
    os.truncate(newest, os.path.getsize(newest) // 2)
    capsys.readouterr()
    assert run.main(path, resume=True) == 1
    line = error_line(capsys)
    assert f"no usable checkpoint of run {new_id}" in line and "corrupt" in line, line
    assert not os.path.exists(os.path.join(out, "model.pt"))
    # A stray checkpoint of the old run as the previous one (no sidecar): named, not taken.
    torch.save(stray, previous_checkpoint_path(out, 0))
    capsys.readouterr()
    assert run.main(path, resume=True) == 1
    line = error_line(capsys)
    assert f"belongs to another run ({old_id}), not to run {new_id}" in line, line
    model = os.path.join(out, "model.pt")
    assert not os.path.exists(model) or open(model, "rb").read() != old_model


@pytest.mark.slow
def test_the_issue_sequence_with_a_real_kill(tmp_path):
    # As a user would: run; --overwrite with another seed, kill -9 after its first save;
    # truncate the newest checkpoint; --resume. One error line, exit 1, no model.pt.
    path, out = _config(tmp_path, num_image=64, num_epoch=1, save_every=3)
    assert run_train(path, timeout=300).returncode == 0
    old_id = log_run_id(os.path.join(out, "training.log"))
    path, _ = _config(tmp_path, num_image=8 * 400, num_epoch=1, save_every=3,
                      extra="config.seed = 7\n")  # fmt: skip
    newest = checkpoint_path(out, 0)
    proc = subprocess.Popen(
        [sys.executable, TRAIN_PY, path, "--overwrite"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and sidecar_run_id(newest) in (None, old_id):
        time.sleep(0.05)  # until the new run's first checkpoint is complete
    proc.kill()
    proc.wait()
    new_id = log_run_id(os.path.join(out, "training.log"))
    assert _run_ids(out) == {new_id} != {old_id}
    os.truncate(newest, os.path.getsize(newest) // 2)
    done = run_train(path, "--resume", timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and f"no usable checkpoint of run {new_id}" in errors[0], errors
    assert not os.path.exists(os.path.join(out, "model.pt"))


# -- run ids in every file -------------------------------------------------------------------------


@pytest.mark.slow
def test_the_run_id_is_in_the_log_checkpoints_and_model_and_kept_by_a_resume(
    tmp_path, monkeypatch, capsys
):
    path, out = _config(tmp_path, num_image=64, num_epoch=2, save_every=3)
    _killed_after_first_save(monkeypatch, path)
    run_id = log_run_id(os.path.join(out, "training.log"))
    assert _run_ids(out) == {run_id}
    stale = os.path.join(out, ".checkpoint_gpu_0.pt.abcd1234.tmp")  # left by a killed save
    open(stale, "wb").write(b"x")
    assert run.main(path, resume=True) == 0
    log = open(os.path.join(out, "training.log")).read()
    assert log_run_id(os.path.join(out, "training.log")) == run_id
    assert _run_ids(out) == {run_id}
    # This start's lines come after its header, and the temp file is named once.
    this_start = log.rsplit("==== run started", 1)[1]
    assert "resumed from" in this_start and "abcd1234" in this_start
    assert log.count("abcd1234") == 1 and not os.path.exists(stale)
    record = model_metadata(torch.load(os.path.join(out, "model.pt")))
    assert record == {"run_id": run_id, "global_step": 16}
    # model.pt stays a plain state_dict: the network loads it strictly.
    backbone = loop.build_backbone(load_config(path), torch.device("cpu"))
    backbone.load_state_dict(torch.load(os.path.join(out, "model.pt")), strict=True)


@pytest.mark.slow
def test_a_checkpoint_from_before_run_ids_resumes_with_one_warning(tmp_path, monkeypatch):
    path, out = _config(tmp_path, num_image=64, num_epoch=2, save_every=3)
    _killed_after_first_save(monkeypatch, path)
    # Make it look written by an older otface: no id in the checkpoint, its sidecar or the log.
    state = torch.load(checkpoint_path(out, 0), weights_only=False)
    for key in ("run_id", "run_config"):
        del state[key]
    os.unlink(checkpoint_path(out, 0))
    os.unlink(checkpoint_path(out, 0) + ".sha256")
    save_checkpoint(state, out, 0)
    log = os.path.join(out, "training.log")
    text = re.sub(r"\(run [0-9a-f-]+, ", "(", open(log).read())
    open(log, "w").write(text)
    assert log_run_id(log) is None
    assert run.main(path, resume=True) == 0
    text = open(log).read()
    assert text.count("written before runs had ids") == 1, text
    assert "cannot be verified" not in text and "holds no RNG state" not in text
    run_id = log_run_id(log)
    assert run_id is not None and _run_ids(out) == {run_id}  # from now on it has an id


# -- §2: keys that fix the tensors' shapes ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "key, value", [("network", "mbf"), ("num_classes", 20), ("embedding_size", 256)]
)
def test_a_resume_with_a_changed_shape_key_is_one_error_line(
    tmp_path, monkeypatch, capsys, key, value
):
    path, out = _config(tmp_path, num_image=64, num_epoch=2, save_every=3)
    _killed_after_first_save(monkeypatch, path)
    before = _files(out)
    old = {"network": "r18_lite", "num_classes": 16, "embedding_size": 512}[key]
    path, _ = _config(tmp_path, num_image=64, num_epoch=2, extra=f"config.{key} = {value!r}\n")
    loaded: list = []
    original_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: loaded.append(k.get("mmap")) or original_load(*a, **k)
    )
    capsys.readouterr()
    assert run.main(path, resume=True) == 2
    line = error_line(capsys)
    assert f"key {key!r}" in line and repr(old) in line and repr(value) in line, line
    assert "init_backbone" in line and "back" in line, line
    assert all(loaded), "a checkpoint was read whole before the config was compared"
    assert _files(out) == before  # nothing written


@pytest.mark.slow
def test_a_checkpoint_without_its_config_that_does_not_fit_is_one_error_line(
    tmp_path, monkeypatch, capsys
):
    path, out = _config(tmp_path, num_image=64, num_epoch=2, save_every=3)
    _killed_after_first_save(monkeypatch, path)
    state = torch.load(checkpoint_path(out, 0), weights_only=False)
    del state["run_config"]  # as written before checkpoints recorded it
    os.unlink(checkpoint_path(out, 0))
    save_checkpoint(state, out, 0)
    path, _ = _config(tmp_path, num_image=64, num_epoch=2, extra="config.num_classes = 20\n")
    capsys.readouterr()
    assert run.main(path, resume=True) == 2
    line = error_line(capsys)
    assert "does not fit this config's network, num_classes, embedding_size" in line, line
    assert "size mismatch" in line and "init_backbone" in line, line


# -- §5: --resume, finished runs, failed starts ----------------------------------------------------


@pytest.mark.slow
def test_train_py_resume_continues_a_killed_run_to_the_same_model(tmp_path):
    keys = dict(num_image=8 * 30, num_epoch=1, save_every=4)
    whole_path, whole_out = _config(tmp_path, name="whole", **keys)
    assert run.main(whole_path) == 0
    path, out = _config(tmp_path, name="killed", **keys)
    proc = start_train(
        path,
        wait_for=checkpoint_path(out, 0),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-2000:]
    line = next(x for x in output.splitlines() if "interrupted (SIGTERM)" in x)
    assert line.endswith(f"; to continue: python {TRAIN_PY} {path} --resume"), line
    done = run_train(path, "--resume", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(
        torch.cat([t.flatten() for t in torch.load(os.path.join(out, "model.pt")).values()]),
        torch.cat([t.flatten() for t in torch.load(os.path.join(whole_out, "model.pt")).values()]),
    )
    # Resuming it again: it has finished. One line, exit 0, no training claimed, log unchanged.
    log = open(os.path.join(out, "training.log")).read()
    again = run_train(path, "--resume", timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    lines = [x for x in (again.stdout + again.stderr).splitlines() if x.strip()]
    assert len(lines) == 1 and "already finished" in lines[0], lines
    assert "finished:" not in lines[0]
    assert open(os.path.join(out, "training.log")).read() == log
    # --resume excludes the flags that start a new run.
    both = run_train(path, "--resume", "--overwrite", timeout=60)
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_a_resume_with_no_checkpoint_writes_nothing(tmp_path, capsys):
    path, out = _config(tmp_path, num_image=64, num_epoch=1)
    assert run.main(path, resume=True) == 1
    line = error_line(capsys)
    assert "holds no checkpoint" in line and "nothing was written" in line, line
    assert not os.path.exists(out)


def test_a_resume_of_a_finished_run_that_kept_no_checkpoints_says_so(tmp_path, capsys):
    extra = "config.save_all_states = False\n"
    path, out = _config(tmp_path, num_image=16, num_epoch=1, extra=extra)
    assert run.main(path) == 0
    capsys.readouterr()
    before = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}
    assert run.main(path, resume=True) == 0
    said = capsys.readouterr()
    assert "already finished" in said.out and "kept no checkpoints" in said.out, said
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == before
    # A model.pt of another run (the log names this one) is not taken for it.
    torch.save({"x": torch.zeros(1)}, os.path.join(out, "model.pt"))
    assert run.main(path, resume=True) == 1
    assert "holds no checkpoint" in error_line(capsys)


def test_a_failed_start_leaves_no_folder_and_the_fix_runs_without_a_flag(tmp_path, capsys):
    path, out = _config(tmp_path, num_image=16, num_epoch=1, extra="config.network = 'r18_lit'\n")
    assert run.main(path) == 2
    assert "r18_lit" in error_line(capsys)
    assert not os.path.exists(out)
    path, out = _config(tmp_path, num_image=16, num_epoch=1)
    assert run.main(path) == 0
    assert os.path.isfile(os.path.join(out, "model.pt"))


@pytest.mark.slow
def test_a_failed_overwrite_leaves_the_old_run_exactly_as_it_was(tmp_path, capsys):
    path, out = _config(tmp_path, num_image=16, num_epoch=1)
    assert run.main(path) == 0
    before = _files(out)
    bad, _ = _config(
        tmp_path, num_image=16, num_epoch=1, extra=f"config.init_backbone = {str(tmp_path)!r}\n"
    )
    assert run.main(bad, existing="overwrite") == 2
    assert "init_backbone" in error_line(capsys)
    assert _files(out) == before
    # Resuming it (it has finished) writes nothing either.
    assert run.main(path, resume=True) == 0
    assert _files(out) == before


# -- §3: a dead DataLoader worker ------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        text = open(f"/proc/{pid}/task/{pid}/children").read()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@pytest.mark.slow
def test_a_killed_dataloader_worker_is_one_error_line(tmp_path):
    from test_train_reliability import _write_rec

    rec = _write_rec(tmp_path / "rec", identities=8, per_id=8)
    path, out = _config(
        tmp_path, rec=rec, num_classes=8, num_image=64, num_epoch=40, save_every=2,
        num_workers=2,
    )  # fmt: skip
    proc = start_train(
        path, wait_for=checkpoint_path(out, 0), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    if not os.path.exists("/proc/self/task"):
        proc.kill()
        pytest.skip("needs /proc to find the worker processes")
    deadline = time.time() + 60
    workers: list[int] = []
    while time.time() < deadline and len(workers) < 2:
        workers = _loader_workers(proc.pid)
        time.sleep(0.1)
    assert workers, "no DataLoader worker found"
    victim = workers[-1]
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    line = errors[0]
    assert f"pid {victim} was killed by SIGKILL" in line, line
    assert "memory" in line and "num_workers = 2" in line, line
    assert f"last complete checkpoint is {checkpoint_path(out, 0)}" in line, line
    assert line.endswith(f"{path} --resume"), line


def _loader_workers(pid: int) -> list[int]:
    """DataLoader workers of ``pid``: children of its forkserver, or spawned children."""
    found = []
    for child in _children(pid):
        command = _cmdline(child)
        if "forkserver" in command:
            found += _children(child)
        elif "spawn_main" in command:
            found.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        return ""


# -- §4: smaller things ----------------------------------------------------------------------------


def test_a_full_disk_before_any_checkpoint_says_none_was_written(tmp_path, monkeypatch, capsys):
    import errno

    from otface.train import log as train_log

    path, out = _config(tmp_path, num_image=64, num_epoch=1, save_every=0)
    original = loop.Trainer.train_step

    def fill_the_disk(self, img, labels):
        result = original(self, img, labels)
        if self.global_step == 2:
            err = OSError(errno.ENOSPC, "No space left on device")
            train_log._record_failure(os.path.join(out, "training.log"), err)
        return result

    monkeypatch.setattr(loop.Trainer, "train_step", fill_the_disk)
    assert run.main(path) == 1
    line = error_line(capsys)
    assert "No space left on device" in line and "training stopped" in line, line
    assert "this run wrote no checkpoint" in line and "already written" not in line, line


def test_a_diverged_run_stops_before_its_next_periodic_checkpoint(tmp_path, monkeypatch, capsys):
    extra = "config.max_skipped_fraction = 0.2\n"
    path, out = _config(tmp_path, num_image=64, num_epoch=1, save_every=2, extra=extra)
    original = loop.Trainer.train_step

    def diverge(self, img, labels):  # every batch from step 3 on is NaN: its step is skipped
        if self.global_step >= 2:
            img = torch.full_like(img, float("nan"))
        return original(self, img, labels)

    monkeypatch.setattr(loop.Trainer, "train_step", diverge)
    assert run.main(path) == 1
    assert "max_skipped_fraction" in error_line(capsys)
    # Steps 3 and 4 were skipped (2 of 4): the save at step 4 is not made, nor any later one.
    assert torch.load(checkpoint_path(out, 0), weights_only=False)["global_step"] == 2
    assert not os.path.exists(os.path.join(out, "model.pt"))


def test_a_warning_from_one_place_is_logged_once_per_run(tmp_path):
    import warnings

    from otface.train.log import close_log_file, init_logging

    init_logging(0, str(tmp_path))
    try:
        for _ in range(5):
            with warnings.catch_warnings():  # what clears Python's own once-per-place registry
                warnings.simplefilter("default")
            warnings.warn("autocast(args...) is deprecated", FutureWarning, stacklevel=1)
    finally:
        close_log_file()
    log = (tmp_path / "training.log").read_text()
    assert log.count("is deprecated") == 1, log


def test_a_freeze_covering_the_whole_run_is_warned_about(tmp_path):
    path, _ = _config(tmp_path, num_image=64, num_epoch=1, extra="config.freeze_steps = 200\n")
    env = loop.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.warns(UserWarning, match=r"freeze_steps = 200 covers the whole run of 8 steps"):
        loop.Trainer(load_config(path), env)


def test_a_folder_holds_a_run_only_once_a_run_has_trained(tmp_path):
    from otface.train.claim import holds_run

    assert holds_run(str(tmp_path / "absent")) == []
    log = tmp_path / "training.log"
    log.write_text("Training: ...-==== run started ...: train.py configs/x (run 1-2-3, ...) ====\n")
    assert holds_run(str(tmp_path)) == []  # a start that never reached its first step
    with log.open("a") as f:
        f.write("Training: ...-Speed 1.0 samples/sec   Loss 1.0   Epoch: 0   Global Step: 1\n")
    assert holds_run(str(tmp_path)) == ["training.log"]
    (tmp_path / "checkpoint_gpu_0.prev.pt").write_bytes(b"x")
    (tmp_path / "checkpoint_gpu_0.prev.pt.sha256").write_text("x")
    assert holds_run(str(tmp_path)) == ["checkpoint_gpu_0.prev.pt", "training.log"]


def test_a_dead_worker_is_named_with_its_signal_and_cause():
    from types import SimpleNamespace

    from otface.train.workers import dead_worker_error

    workers = [SimpleNamespace(pid=11, exitcode=None), SimpleNamespace(pid=12, exitcode=-9)]
    loader = SimpleNamespace(_iterator=SimpleNamespace(_workers=workers))
    err = RuntimeError("DataLoader worker (pid(s) 12) exited unexpectedly")
    message = str(dead_worker_error(err, loader, num_workers=2))
    assert message.startswith("DataLoader worker pid 12 was killed by SIGKILL: most likely")
    assert "num_workers = 2" in message
    # Without the processes (not persistent), torch's own words name the signal.
    err = RuntimeError("DataLoader worker (pid 13) is killed by signal: Segmentation fault. ")
    message = str(dead_worker_error(err, None, num_workers=4))
    assert message == "DataLoader worker pid 13 was killed by SIGSEGV"
    assert dead_worker_error(RuntimeError("CUDA out of memory"), loader, num_workers=2) is None
    # Killed while the main process fetched a batch's shared memory from it: the socket's error
    # names no worker, the exit codes do.
    err = ConnectionResetError(104, "Connection reset by peer")
    message = str(dead_worker_error(err, loader, num_workers=2))
    assert message.startswith("DataLoader worker pid 12 was killed by SIGKILL: most likely")
    alive = SimpleNamespace(_iterator=SimpleNamespace(_workers=workers[:1]))
    assert dead_worker_error(err, alive, num_workers=2) is None
    assert dead_worker_error(EOFError(), None, num_workers=2) is None


def test_an_overwrite_killed_before_its_first_step_gives_the_old_run_back(tmp_path, capsys):
    path, out = _config(tmp_path, num_image=16, num_epoch=1)
    aside = os.path.join(out, ".replaced")
    os.makedirs(os.path.join(aside, "tensorboard", "old-run"))
    old_log = "Training: x-==== run started (run old-run, ...) ====\nTraining: Global Step: 1\n"
    open(os.path.join(aside, "training.log"), "w").write(old_log)
    open(os.path.join(aside, "checkpoint_gpu_0.pt"), "wb").write(b"the old run's")
    # What the killed start had written in their place: a log with no step, its events folder.
    open(os.path.join(out, "training.log"), "w").write("Training: x-==== run started ====\n")
    os.makedirs(os.path.join(out, "tensorboard", "new-run"))
    assert run.main(path) == 2  # the old run is back, so a plain start is refused again
    assert "already holds a run" in error_line(capsys)
    assert not os.path.exists(aside)
    assert open(os.path.join(out, "training.log")).read() == old_log
    assert os.listdir(os.path.join(out, "tensorboard")) == ["old-run"]
    assert open(checkpoint_path(out, 0), "rb").read() == b"the old run's"
