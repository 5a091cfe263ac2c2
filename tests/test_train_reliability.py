"""Trainer reliability over a long run: NaN batches, exact resume, corrupt checkpoints, ranks
that disagree, signals, and one-line errors instead of tracebacks."""

import logging
import os
import re
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from _jobs import TINY_RUN, write_job
from _spawn import join_gloo, run_train, spawn_ranks, start_train

from otface.config import ConfigError, load_config
from otface.data.rec_writer import write_rec
from otface.loss import OTFaceCriterion
from otface.train import loop, run
from otface.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    previous_checkpoint_path,
    save_checkpoint,
)
from otface.train.distributed import DistEnv, shutdown_distributed
from otface.train.guard import TooManySkippedSteps
from otface.train.identity import log_run_id
from otface.train.signals import Terminated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ORIGINAL_STEP = loop.Trainer.train_step


def _write_rec(folder, *, identities=8, per_id=4, seed=0, bad=()):
    """A small .rec; ``bad`` lists (label, j) images written as undecodable bytes."""
    rng = np.random.default_rng(seed)
    samples = []
    for label in range(identities):
        base = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
        for j in range(per_id):
            if (label, j) in bad:
                samples.append((label, b"not an image at all"))
                continue
            img = cv2.resize(base, (112, 112), interpolation=cv2.INTER_NEAREST)
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            img[:, :40] //= 2  # asymmetric, so that a flip changes the image
            ok, buf = cv2.imencode(".jpg", img)
            samples.append((label, buf.tobytes()))
    write_rec(folder, samples)
    return str(folder)


def _config(
    tmp_path,
    *,
    rec="synthetic",
    num_classes=16,
    num_image=64,
    num_epoch=2,
    save_every=0,
    num_workers=0,
    name="job",
    extra="",
):
    out = str(tmp_path / "work_dirs" / name)
    keys = {
        **TINY_RUN,
        "rec": rec,
        "num_classes": num_classes,
        "num_image": num_image,
        "num_epoch": num_epoch,
        "warmup_epoch": 0.5,
        "num_workers": num_workers,
        "save_every_steps": save_every,
        "save_all_states": True,
        "sampler": {"type": "pk", "k": 2},
        "output": out,
    }
    return write_job(tmp_path, name, keys, extra=extra), out


def _env():
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


# -- NaN batches -------------------------------------------------------------------------------


def _cpu_grad_scaler():
    # The fp16 path's scaler on CPU tensors: unscale_, the Inf flag and update() as on CUDA.
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=100)


@pytest.mark.parametrize(
    "scaler, head",
    [(False, "combined"), (True, "combined"), (True, "adaface"), (False, "curricularface")],
)
def test_nan_batch_leaves_every_tensor_of_the_model_as_before(tmp_path, scaler, head):
    # The criterion's state includes a margin head's running statistics (AdaFace's norm mean
    # and std, CurricularFace's t), which the NaN batch's forward has already updated.
    extra = f"config.sampler = edict(type='uniform')\nconfig.head = {head!r}\n"
    path, _ = _config(tmp_path, extra=extra)
    cfg = load_config(path)
    loop.seed_everything(cfg.seed)
    trainer = loop.Trainer(cfg, _env())
    if scaler:
        trainer.grad_scaler = _cpu_grad_scaler()
    g = torch.Generator().manual_seed(0)
    trainer.train_step(torch.rand(8, 3, 112, 112, generator=g) * 2 - 1, torch.arange(8))
    before = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
    fc_before = {k: v.clone() for k, v in trainer.criterion.state_dict().items()}
    img = torch.rand(8, 3, 112, 112, generator=g) * 2 - 1
    img[3] = float("nan")
    trainer.train_step(img, torch.arange(8))
    assert trainer.skipped_steps == 1
    after = trainer.backbone.state_dict()
    assert sum("running_var" in k for k in before) > 10
    for k, v in before.items():  # BatchNorm running statistics and counters included
        assert torch.equal(after[k], v), k
    for k, v in trainer.criterion.state_dict().items():
        assert torch.equal(v, fc_before[k]), k
    # The next clean batch trains normally and resets the consecutive count.
    trainer.train_step(torch.rand(8, 3, 112, 112, generator=g) * 2 - 1, torch.arange(8))
    assert trainer.skipped_steps == 1 and trainer.skips.consecutive == 0
    assert torch.isfinite(trainer.backbone.state_dict()["bn2.running_var"]).all()
    if scaler:  # the Inf step halved the scale, the clean ones kept it
        assert trainer.grad_scaler.get_scale() == 2.0**9


@pytest.mark.parametrize("head", ["combined", "adaface", "curricularface"])
def test_optimiser_step_reads_the_device_once_with_a_grad_scaler(tmp_path, head):
    # fp16 training: the step's only host read is its skip decision; the scaler's Inf flag
    # joins it on the device instead of being read again by scaler.step(). A margin head's
    # running statistics add none.
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    extra = f"config.sampler = edict(type='uniform')\nconfig.head = {head!r}\n"
    path, _ = _config(tmp_path, extra=extra)
    trainer = loop.Trainer(load_config(path), _env())
    trainer.grad_scaler = _cpu_grad_scaler()
    reads = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith("_local_scalar_dense"):
                stack = traceback.extract_stack()
                reads.append([f"{os.path.basename(f.filename)}:{f.name}" for f in stack])
            return func(*args, **(kwargs or {}))

    img = torch.rand(8, 3, 112, 112) * 2 - 1
    trainer.train_step(img, torch.arange(8))
    with Reads():
        trainer.train_step(img, torch.arange(8))
    in_step = [r for r in reads if "optim.py:optimizer_step" in r]
    assert len(in_step) == 1
    assert not any(f.startswith("heads.py") or "_head_inputs" in f for r in reads for f in r)
    assert not any("grad_scaler.py:step" in frame for r in reads for frame in r)


def test_consecutive_skips_stop_the_run(tmp_path):
    path, _ = _config(tmp_path, extra="config.max_consecutive_skips = 3\n")
    cfg = load_config(path)
    trainer = loop.Trainer(cfg, _env())
    nan = torch.full((8, 3, 112, 112), float("nan"))
    trainer.train_step(nan, torch.arange(8))
    trainer.train_step(nan, torch.arange(8))
    with pytest.raises(TooManySkippedSteps, match="3 consecutive optimiser steps were skipped"):
        trainer.train_step(nan, torch.arange(8))


def test_nan_metrics_are_logged_and_skips_counted(tmp_path, monkeypatch):
    # 2 skips of 8 steps: past the default max_skipped_fraction (0.2), which this test is
    # not about.
    path, out = _config(
        tmp_path, num_image=64, num_epoch=1, extra="config.max_skipped_fraction = 1.0\n"
    )
    original = _ORIGINAL_STEP

    def poisoned(self, img, labels):
        if self.global_step + 1 in (3, 4):
            img = img.clone()
            img[0] = float("nan")
        return original(self, img, labels)

    monkeypatch.setattr(loop.Trainer, "train_step", poisoned)
    rc = run.main(path)
    assert rc == 0
    log = open(os.path.join(out, "training.log")).read()
    lines = [line for line in log.splitlines() if "Global Step: 4 " in line]
    assert lines and "Loss nan" in lines[0] and "skipped_steps 2" in lines[0], lines
    assert "finished: 8 steps (2 optimiser steps skipped)" in log
    model = torch.load(os.path.join(out, "model.pt"))
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


# -- exact resume ------------------------------------------------------------------------------


def _losses(monkeypatch, record, stop_at=None):
    original = _ORIGINAL_STEP

    class Stop(Exception):
        pass

    def wrapped(self, img, labels):
        if stop_at is not None and self.global_step + 1 == stop_at:
            raise Stop()
        out = original(self, img, labels)
        record.append((self.global_step, out.loss.item()))
        return out

    monkeypatch.setattr(loop.Trainer, "train_step", wrapped)
    return Stop


def _kill_and_resume(tmp_path, monkeypatch, extra=""):
    """A 12-step run, and the same run killed in step 8 and resumed from its step-5
    checkpoint: both trainers at their end and the losses (uninterrupted, first part,
    resumed)."""
    rec = _write_rec(tmp_path / "rec")
    kw = dict(rec=rec, num_classes=8, num_image=32, num_epoch=3, save_every=5, extra=extra)
    path, _ = _config(tmp_path, name="whole", **kw)
    whole: list = []
    _losses(monkeypatch, whole)
    whole_trainer = loop.fit(load_config(path), _env())
    assert len(whole) == 12

    path, _ = _config(tmp_path, name="killed", **kw)
    first: list = []
    stop = _losses(monkeypatch, first, stop_at=8)  # dies in step 8; checkpoint at step 5
    with pytest.raises(stop):
        loop.fit(load_config(path), _env())
    resumed: list = []
    _losses(monkeypatch, resumed)
    cfg = load_config(path)
    cfg.resume = True
    resumed_trainer = loop.fit(cfg, _env())
    assert [s for s, _ in resumed] == list(range(6, 13))
    return whole_trainer, resumed_trainer, whole, first, resumed


@pytest.mark.slow
def test_killed_and_resumed_run_repeats_the_uninterrupted_one(tmp_path, monkeypatch):
    _, _, whole, first, resumed = _kill_and_resume(tmp_path, monkeypatch)
    # Loss for loss, bit for bit: batch order, flips, dropout and Partial FC all repeat.
    assert resumed == whole[5:]
    assert first == whole[:7]


@pytest.mark.slow
@pytest.mark.parametrize("head", ["adaface", "curricularface"])
def test_resumed_head_statistics_repeat_the_uninterrupted_run(tmp_path, monkeypatch, head):
    whole_trainer, resumed_trainer, whole, first, resumed = _kill_and_resume(
        tmp_path, monkeypatch, extra=f"config.head = {head!r}\n"
    )
    assert resumed == whole[5:] and first == whole[:7]
    stats = [t.criterion.partial_fc.statistics() for t in (whole_trainer, resumed_trainer)]
    assert stats[0].keys() == stats[1].keys() and len(stats[0]) >= 1
    for name, value in stats[0].items():
        assert torch.equal(value, stats[1][name]), name
    # They moved from their initial values (AdaFace 20 and 100, CurricularFace 0).
    initial = {"head_norm_mean": 20.0, "head_norm_std": 100.0, "head_t": 0.0}
    assert all(float(v) != initial[k] for k, v in stats[0].items())


@pytest.mark.slow
def test_runs_repeat_with_any_number_of_workers(tmp_path, monkeypatch):
    rec = _write_rec(tmp_path / "rec")
    runs = []
    for index, workers in enumerate((0, 2, 2)):
        path, _ = _config(
            tmp_path,
            name=f"run{index}",
            rec=rec,
            num_classes=8,
            num_image=32,
            num_epoch=1,
            num_workers=workers,
        )
        record: list = []
        _losses(monkeypatch, record)
        loop.fit(load_config(path), _env())
        runs.append(record)
    assert runs[0] == runs[1] == runs[2]


# -- undecodable images -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.05, 0.0])
def test_undecodable_images_are_counted_and_stop_past_the_budget(tmp_path, fraction):
    rec = _write_rec(tmp_path / "rec", bad={(2, 1)})
    path, out = _config(
        tmp_path,
        rec=rec,
        num_classes=8,
        num_image=32,
        num_epoch=2,
        extra=f"config.max_bad_image_fraction = {fraction}\n",
    )
    done = run_train(path, timeout=240)
    if fraction:  # 1 bad image in 32 read per epoch: within 5%
        assert done.returncode == 0, done.stderr[-2000:]
        log = open(os.path.join(out, "training.log")).read()
        assert "bad_images 1" in log and "bad_images 2" in log  # once per epoch, counted
        assert "record key" in done.stderr + log  # the warning names the record
    else:
        assert done.returncode == 1, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: 1 undecodable image in this epoch"), last
        # 0.0 x 32 images allows none: the line says which fraction would allow one.
        assert "max_bad_image_fraction = 0.0312 allows one" in last, last


# -- corrupt checkpoints -----------------------------------------------------------------------


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog):
    caplog.set_level(logging.INFO)  # "resumed from ..." is an INFO line
    path, out = _config(tmp_path, num_image=64, num_epoch=2, save_every=3)
    loop.fit(load_config(path), _env())
    newest = checkpoint_path(out, 0)
    previous = previous_checkpoint_path(out, 0)
    prev_step = torch.load(previous, weights_only=False)["global_step"]
    with open(newest, "r+b") as f:  # the probe: 256 bytes in the middle
        f.seek(os.path.getsize(newest) // 2)
        f.write(os.urandom(256))
    (tmp_path / "work_dirs" / "job" / ".checkpoint_gpu_0.pt.abcd1234.tmp").write_bytes(b"x")
    cfg = load_config(path)
    cfg.resume = True
    cfg.num_epoch = 3
    trainer = loop.fit(cfg, _env())
    log = (
        open(os.path.join(out, "training.log")).read()
        if os.path.exists(os.path.join(out, "training.log"))
        else ""
    )
    messages = caplog.text + log
    assert "checkpoint_gpu_0.pt" in messages and "corrupt" in messages.lower()
    assert f"global step {prev_step}," in caplog.text
    assert trainer.global_step == 24
    assert not list((tmp_path / "work_dirs" / "job").glob(".checkpoint_gpu_0.pt.*.tmp"))


def test_resuming_with_another_head_names_the_head(tmp_path):
    path, _ = _config(tmp_path, num_epoch=1)
    loop.fit(load_config(path), _env())
    cfg = load_config(path)
    cfg.resume, cfg.head, cfg.num_epoch = True, "adaface", 2
    with pytest.raises(CheckpointError, match="head = 'adaface'.*margin_softmax.batch_mean"):
        loop.Trainer(cfg, _env()).resume()


def _resume_worker(rank, world_size, port, path, result_dir):
    env = join_gloo(rank, world_size, port)
    try:
        cfg = load_config(path)
        cfg.resume = True
        trainer = loop.Trainer(cfg, env)
        try:
            trainer.resume()
            result = ("ok", trainer.global_step)
        except Exception as err:  # noqa: BLE001 - the test reads the message
            result = (type(err).__name__, str(err))
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        shutdown_distributed()


def _run_two_ranks(path, result_dir):
    spawn_ranks(_resume_worker, path, str(result_dir))
    return [torch.load(result_dir / f"rank{r}.pt") for r in range(2)]


def _fake_checkpoint(cfg, rank, *, global_step):
    # Rank `rank` of 2: its half of the class centres (a fresh optimiser holds no state).
    trainer = loop.Trainer(cfg, _env())
    trainer.global_step = global_step
    state = trainer.state(epoch=0, epoch_step=global_step)
    half = cfg.num_classes // 2
    fc = state["state_dict_softmax_fc"]
    fc["weight"] = fc["weight"][rank * half : (rank + 1) * half].clone()
    # Written as by an older otface, which did not record the world size: it is inferred from
    # the two ranks' files.
    for key in ("world_size", "total_batch_size", "lr_schedule"):
        del state[key]
    save_checkpoint(state, cfg.output, rank)


@pytest.mark.slow
def test_ranks_at_different_steps_fall_back_or_fail_naming_them(tmp_path):
    path, out = _config(tmp_path, num_image=200, extra="config.sampler = edict(type='uniform')\n")
    cfg = load_config(path)
    for step in (4, 8):
        _fake_checkpoint(cfg, 0, global_step=step)
    _fake_checkpoint(cfg, 1, global_step=4)
    # Rank 0 is one save ahead: it falls back to its previous checkpoint, step 4.
    results = _run_two_ranks(path, tmp_path)
    assert results == [("ok", 4), ("ok", 4)]
    # Now rank 1 has nothing at step 8 or 6: every rank fails naming both ranks' steps.
    for step in (12, 16):
        _fake_checkpoint(cfg, 0, global_step=step)
    results = _run_two_ranks(path, tmp_path)
    for kind, message in results:
        assert kind == "CheckpointError"
        assert "rank 0 at global step 16" in message and "rank 1 at global step 4" in message


# -- signals and one-line errors ---------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_reports_the_last_complete_checkpoint(tmp_path):
    path, out = _config(tmp_path, num_image=8 * 400, num_epoch=1, save_every=2)
    ckpt = checkpoint_path(out, 0)
    proc = start_train(
        path, wait_for=ckpt, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-2000:]
    line = next(x for x in output.splitlines() if "interrupted (SIGTERM)" in x)
    assert f"this run's last complete checkpoint is {ckpt} (global step " in line
    steps = [int(v) for v in re.findall(r"global step (\d+)", line)]
    assert len(steps) == 2 and steps[1] <= steps[0] and steps[1] % 2 == 0, line
    assert "Traceback" not in output


@pytest.mark.slow
def test_interrupt_of_a_new_run_never_offers_an_older_runs_checkpoint(tmp_path):
    # A finished run leaves its checkpoint; a new run replaces it (--overwrite) and is stopped
    # after its first step but before it writes a checkpoint: the message must say so, and the
    # old run's checkpoint is gone rather than offered.
    path, out = _config(tmp_path, num_image=64, num_epoch=1, save_every=0)
    assert run.main(path) == 0
    old = checkpoint_path(out, 0)
    assert os.path.isfile(old)
    path2, _ = _config(tmp_path, num_image=8 * 400, num_epoch=1, save_every=0, name="job")
    log = os.path.join(out, "training.log")
    old_run = log_run_id(log)
    proc = start_train(
        path2,
        "--overwrite",  # else refused: the folder holds a run
        wait_for=log,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120

    def training_again():  # the new run's log (the old one was replaced) has a step line
        text = _read(log)
        new_run = log_run_id(log) not in (None, old_run)
        return new_run and "Global Step:" in text and not os.path.exists(out + "/.replaced")

    while time.time() < deadline and proc.poll() is None and not training_again():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-2000:]
    line = next(x for x in output.splitlines() if "interrupted (SIGTERM)" in x)
    assert "this run wrote no checkpoint" in line and "cannot be resumed" in line, line
    assert "last complete checkpoint" not in line and "--resume" not in line
    assert not os.path.exists(old)


def _read(path):
    try:
        return open(path).read()
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_rec", "no such folder"),
        ("output_is_a_file", "the folder cannot be written"),
        ("resume_without_checkpoint", "holds no checkpoint"),
        ("too_few_identities", "identities"),
        ("num_image_below_batch", "smaller than one global batch"),
    ],
)
def test_bad_setup_is_one_error_line(tmp_path, case, expected):
    kw: dict = {}
    extra = ""
    if case == "missing_rec":
        kw["rec"] = str(tmp_path / "no_such_rec")
    elif case == "output_is_a_file":
        (tmp_path / "blocker").write_text("a file, not a folder")
        extra = f"config.output = {str(tmp_path / 'blocker' / 'out')!r}\n"
    elif case == "resume_without_checkpoint":
        extra = "config.resume = True\n"
    elif case == "too_few_identities":
        kw.update(rec=_write_rec(tmp_path / "rec", identities=3), num_classes=3, num_image=12)
    elif case == "num_image_below_batch":
        kw["num_image"] = 4
    path, out = _config(tmp_path, **kw, extra=extra)
    done = run_train(path, timeout=180)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode in (1, 2), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines
    if case in ("missing_rec", "resume_without_checkpoint"):  # nothing written
        assert not os.path.exists(out)


# -- gradient accumulation ---------------------------------------------------------------------


def test_lambda_warmup_counts_optimiser_steps(tmp_path):
    path, _ = _config(
        tmp_path,
        extra=(
            "config.loss = 'otface'\n"
            "config.gradient_acc = 2\n"
            "config.otface = edict(warmup_steps=4)\n"
        ),
    )
    cfg = load_config(path)
    trainer = loop.Trainer(cfg, _env())
    assert isinstance(trainer.criterion, OTFaceCriterion)
    g = torch.Generator().manual_seed(0)
    lams = []
    for _ in range(6):
        out = trainer.train_step(torch.rand(8, 3, 112, 112, generator=g), torch.arange(8) // 2)
        lams.append(out.metrics["lambda_ot"].item())
    # Batches 1-2 are optimiser step 1, 3-4 step 2, 5-6 step 3: lambda = lambda_ot * step / 4.
    expected = [cfg.otface.lambda_ot * f for f in (0.25, 0.25, 0.5, 0.5, 0.75, 0.75)]
    assert lams == pytest.approx(expected)


def _acc_worker(rank, world_size, port, path, result_dir):
    env = join_gloo(rank, world_size, port)
    try:
        cfg = load_config(path)
        cfg.gradient_acc = 2
        cfg.batch_size = 4
        trainer = loop.Trainer(cfg, env)
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(trainer.global_step)
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            return allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(None, counting_allreduce)
        g = torch.Generator().manual_seed(5)
        for _ in range(6):
            img = torch.rand(8, 3, 112, 112, generator=g)
            labels = torch.randint(0, 16, (8,), generator=g)
            trainer.train_step(img[4 * rank : 4 * rank + 4], labels[4 * rank : 4 * rank + 4])
        weights = torch.cat([p.detach().flatten() for p in trainer.backbone.parameters()])
        torch.save((sorted(set(calls)), weights), os.path.join(result_dir, f"acc{rank}.pt"))
    finally:
        shutdown_distributed()


@pytest.mark.slow
def test_accumulation_all_reduces_only_on_the_optimiser_step(tmp_path):
    path, _ = _config(tmp_path, num_image=1000, extra="config.sampler = edict(type='uniform')\n")
    spawn_ranks(_acc_worker, path, str(tmp_path))
    (steps0, w0), (steps1, w1) = (torch.load(tmp_path / f"acc{r}.pt") for r in range(2))
    # Batch 1 all-reduces (DDP's static graph records its first backward with hooks on); then
    # only the last batch of each accumulation does.
    assert steps0 == steps1 == [1, 2, 4, 6]
    assert torch.equal(w0, w1)


def test_unknown_key_still_fails_at_start(tmp_path):
    path, _ = _config(tmp_path, extra="config.max_consecutive_skip = 5\n")
    with pytest.raises(ConfigError, match="max_consecutive_skips"):
        load_config(path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_during_a_save_waits_for_it(tmp_path, monkeypatch, sig):
    # A signal inside torch.save would surface as its zip writer's RuntimeError and leave a
    # traceback; the save finishes first, then the interrupt is raised.
    path, out = _config(tmp_path)
    trainer = loop.Trainer(load_config(path), _env())
    original = loop.save_checkpoint
    seen = []

    def save_with_signal(state, output, rank):
        os.kill(os.getpid(), sig)  # arrives while the checkpoint is being written
        seen.append("saving")
        return original(state, output, rank)

    monkeypatch.setattr(loop, "save_checkpoint", save_with_signal)
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.save_state(epoch=0, epoch_step=1)
    assert seen == ["saving"]
    assert isinstance(info.value, Terminated) == (sig == signal.SIGTERM)
    assert trainer.last_checkpoint == checkpoint_path(out, 0)
    assert torch.load(checkpoint_path(out, 0), weights_only=False)["epoch_step"] == 1


# -- divergence: non-finite state never reaches a file ----------------------------------------


def test_forward_that_makes_batchnorm_statistics_infinite_is_skipped(tmp_path):
    # Finite loss and gradients, but the forward pushed running_var to Inf (as a huge learning
    # rate does): the step is skipped and the statistics restored.
    path, _ = _config(tmp_path, extra="config.sampler = edict(type='uniform')\n")
    trainer = loop.Trainer(load_config(path), _env())
    g = torch.Generator().manual_seed(0)
    img = torch.rand(8, 3, 112, 112, generator=g) * 2 - 1
    trainer.train_step(img, torch.arange(8))
    before = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
    bn = trainer.backbone.bn2

    def poison(module, inputs, output):
        module.running_var.data.fill_(float("inf"))  # (.data: no autograd version bump)

    hook = bn.register_forward_hook(poison)
    out = trainer.train_step(img, torch.arange(8))
    hook.remove()
    assert torch.isfinite(out.loss) and trainer.skipped_steps == 1
    for k, v in trainer.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.slow
def test_diverged_run_ends_non_zero_with_finite_files_or_none(tmp_path, capsys):
    # The reproduction: lr = 1e6 at the default limits, one epoch of 64 steps,
    # frequent 1, save_all_states, a checkpoint every 8 steps.
    extra = (
        "config.lr = 1e6\nconfig.frequent = 1\nconfig.save_every_steps = 8\n"
        "config.warmup_epoch = 0\n"
    )
    path, out = _config(tmp_path, num_image=512, num_epoch=1, save_every=8, extra=extra)
    rc = run.main(path)
    err = capsys.readouterr().err
    assert rc == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "max_skipped_fraction" in lines[0], err
    assert not os.path.exists(os.path.join(out, "model.pt"))
    for name in os.listdir(out):
        if name.endswith(".pt"):
            state = torch.load(os.path.join(out, name), map_location="cpu", weights_only=False)
            tensors = state.get("state_dict_backbone", state)
            for key, value in tensors.items():
                if value.is_floating_point():
                    assert torch.isfinite(value).all(), (name, key)


def test_a_save_of_non_finite_state_is_refused_and_the_old_files_stay(tmp_path):
    from otface.train.guard import NonFiniteState

    path, out = _config(tmp_path, extra="config.sampler = edict(type='uniform')\n")
    trainer = loop.Trainer(load_config(path), _env())
    os.makedirs(out, exist_ok=True)
    first = trainer.save_model()
    good = open(first, "rb").read()
    with torch.no_grad():
        trainer.backbone.bn2.weight[0] = float("nan")
    with pytest.raises(NonFiniteState, match=r"bn2\.weight holds NaN or Inf"):
        trainer.save_model()
    with pytest.raises(NonFiniteState, match="checkpoint of rank 0"):
        trainer.save_state(epoch=0, epoch_step=1)
    assert open(first, "rb").read() == good
    assert not os.path.exists(checkpoint_path(out, 0))


def test_evaluation_refuses_non_finite_or_empty_models(tmp_path):
    from otface.evaluation import load_backbone_state

    state = {"a.weight": torch.ones(3), "bn.running_var": torch.tensor([1.0, float("inf")])}
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="holds NaN or Inf in 'bn.running_var'"):
        load_backbone_state(tmp_path / "model.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"the file is empty \(0 bytes\)"):
        load_backbone_state(tmp_path / "empty.pt")


def test_the_first_step_and_the_stopping_skip_are_logged(tmp_path):
    # frequent = 1: step 1 gets its line (its speed counts the start-up); the skipped step that
    # stops the run gets its warning line before the error.
    path, out = _config(tmp_path, num_image=64, num_epoch=1, extra="config.frequent = 1\n")
    assert run.main(path) == 0
    log = open(os.path.join(out, "training.log")).read()
    assert "Global Step: 1 " in log
    path, _ = _config(tmp_path, name="stops", extra="config.max_consecutive_skips = 3\n")
    trainer = loop.Trainer(load_config(path), _env())
    nan = torch.full((8, 3, 112, 112), float("nan"))
    records = []
    handler = logging.Handler()
    handler.emit = records.append  # the run above set up the root logger's own handlers
    logging.getLogger().addHandler(handler)
    try:
        trainer.train_step(nan, torch.arange(8))
        trainer.train_step(nan, torch.arange(8))
        with pytest.raises(TooManySkippedSteps):
            trainer.train_step(nan, torch.arange(8))
    finally:
        logging.getLogger().removeHandler(handler)
    assert any(r.getMessage().startswith("step 3:") for r in records), records


# -- a full disk under the log and TensorBoard --------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 24 KB tmpfs (skipped where mounting is not permitted)."""
    where = tmp_path / "tiny"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    yield where
    subprocess.run(["umount", str(where)], check=False)


@pytest.mark.slow
def test_a_full_disk_under_the_log_is_one_error_line(tmp_path, tiny_disk):
    path, _ = _config(tmp_path, num_image=8 * 200, num_epoch=1, extra="config.frequent = 1\n")
    text = open(path + ".py").read().replace("config.save_all_states = True", "")
    out = str(tiny_disk / "run")
    text += f"config.save_all_states = False\nconfig.output = {out!r}\n"
    open(path + ".py", "w").write(text)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), path], capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and "Logging error" not in output, output[-3000:]
    assert "Exception in thread" not in output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], proc.stderr[-2000:]
    assert "training.log" in errors[0] or "tfevents" in errors[0] or "tensorboard" in errors[0]


def test_tensorboard_write_errors_are_recorded_not_printed(tmp_path, capsys):
    import errno as errno_codes
    import threading

    from otface.train import log as train_log

    train_log._FAILED_WRITE.clear()
    previous_hook = threading.excepthook
    threading.excepthook = train_log._thread_excepthook  # as init_logging sets it
    writer = train_log.SafeSummaryWriter(str(tmp_path / "tensorboard"))

    def full(*args, **kwargs):
        raise OSError(errno_codes.ENOSPC, "No space left on device")

    writer._writer.add_scalar = full
    writer.add_scalar("loss", 1.0, 1)
    with pytest.raises(train_log.OutputWriteError, match="tfevents.*No space left on device"):
        train_log.raise_write_failure()
    # TensorBoard's background thread: recorded, no "Exception in thread" traceback.
    thread = threading.Thread(target=full)
    thread.start()
    thread.join()
    assert "Exception in thread" not in capsys.readouterr().err
    threading.excepthook = previous_hook
    with pytest.raises(train_log.OutputWriteError, match="No space left on device"):
        train_log.raise_write_failure()
    writer.close()


@pytest.mark.slow
def test_a_fresh_run_into_a_folder_holding_a_run_refuses_or_moves_it_aside(tmp_path, capsys):
    path, out = _config(tmp_path, num_image=64, num_epoch=1)
    assert run.main(path) == 0
    model = open(os.path.join(out, "model.pt"), "rb").read()
    open(os.path.join(out, "model.onnx"), "wb").write(b"made from the first model")
    # Refused: one line naming the choices; nothing touched.
    assert run.main(path) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "already holds a run" in lines[0]
    for choice in ("resume = True", "another output", "--overwrite", "--move-aside"):
        assert choice in lines[0], lines[0]
    assert open(os.path.join(out, "model.pt"), "rb").read() == model
    # Overwrite: trains there; the ONNX made from the old model is gone.
    assert run.main(path, existing="overwrite") == 0
    assert not os.path.exists(os.path.join(out, "model.onnx"))
    # Move aside: the old run keeps its folder under a dated name.
    assert run.main(path, existing="move-aside") == 0
    assert "moved the previous run" in capsys.readouterr().out
    aside = [p for p in os.listdir(os.path.dirname(out)) if p.startswith("job.")]
    assert len(aside) == 1
    assert os.path.isfile(os.path.join(os.path.dirname(out), aside[0], "model.pt"))
    moved_log = open(os.path.join(os.path.dirname(out), aside[0], "training.log")).read()
    last = moved_log.strip().splitlines()[-1]  # the old log says where its run went
    assert "moved aside" in last and aside[0] in last and f"name {out}" in last
    assert os.path.isfile(os.path.join(out, "model.pt"))


@pytest.mark.slow
def test_each_run_has_a_log_header_and_its_own_tensorboard_folder(tmp_path, capsys):
    path, out = _config(tmp_path, num_image=64, num_epoch=1)
    assert run.main(path) == 0
    screen = capsys.readouterr().out
    assert "every config key: training.log" in screen
    assert ": network " not in screen  # the full dump stays in the log
    first = log_run_id(os.path.join(out, "training.log"))
    # --overwrite: a new log and a new TensorBoard folder; none of the old run's files stay.
    assert run.main(path, existing="overwrite") == 0
    log = open(os.path.join(out, "training.log")).read()
    assert log.count("==== run started") == 1 and ": network " in log
    second = log_run_id(os.path.join(out, "training.log"))
    assert second != first
    runs = os.listdir(os.path.join(out, "tensorboard"))
    assert runs == [second]
    events = os.listdir(os.path.join(out, "tensorboard", second))
    assert len(events) == 1 and events[0].startswith("events.out")
