"""Elastic resume: checkpoints of 2 ranks resumed on 1 and on 3 (uneven class split), the
re-derived sampler position, and the full-state file's merge / split round trip."""

import collections
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from _spawn import join_gloo, spawn_ranks
from test_train_reliability import _config, _env

from otface import full_state
from otface.config import load_config
from otface.data.sampler import PKBatchSampler, UniformBatchSampler
from otface.partial_fc import shard_range
from otface.train import loop
from otface.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    checksum_path,
    previous_checkpoint_path,
)
from otface.train.distributed import shutdown_distributed
from otface.train.elastic import resume_position

# 16 classes, batch 8 per rank, 96 images, 2 epochs: 6 steps per epoch on 2 ranks, 12 on 1,
# 4 on 3. Saves every 3 steps; the 2-rank run is stopped in step 10, after its save at step 9
# (epoch 1, batch 3: 48 images into the epoch).
KW = dict(num_classes=16, num_image=96, num_epoch=2, save_every=3)
SAVED_STEP, STOP_AT, IMAGES_INTO_EPOCH = 9, 10, 48


class _Stop(Exception):
    pass


def _train_worker(rank, world_size, port, path):
    env = join_gloo(rank, world_size, port)
    original = loop.Trainer.train_step

    def step(self, img, labels):
        if self.global_step + 1 == STOP_AT:
            raise _Stop()
        return original(self, img, labels)

    loop.Trainer.train_step = step
    try:
        loop.fit(load_config(path), env)
    except _Stop:
        pass
    finally:
        shutdown_distributed()


def _fc_momentum(trainer):
    return trainer.optimizer.state[trainer.criterion.partial_fc.weight]["momentum_buffer"]


def _resume_worker(rank, world_size, port, path, output, result_dir):
    """Resume and finish the run on ``world_size`` ranks (one: in this process, no process
    group, as ``python train.py``); saves what the resume loaded and the steps' rates."""
    env = join_gloo(rank, world_size, port) if world_size > 1 else _env()
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    result = {"steps": []}
    resume, train_step = loop.Trainer.resume, loop.Trainer.train_step

    def resumed(self):
        resume(self)
        fc = self.criterion.partial_fc
        result.update(
            weight=fc.weight.detach().clone(),
            momentum=_fc_momentum(self).clone(),
            class_range=(fc.class_start, fc.num_local),
            step=self.global_step,
            group_lrs=[g["lr"] for g in self.optimizer.param_groups],
            lr=self.lr,
            start=(self.start_epoch, self.start_batch),
            total_step=self.total_step,
            backbone={k: v.clone() for k, v in self.backbone.state_dict().items()},
        )

    def step(self, img, labels):
        result["steps"].append((self.global_step + 1, self.optimizer.param_groups[0]["lr"]))
        return train_step(self, img, labels)

    loop.Trainer.resume, loop.Trainer.train_step = resumed, step
    try:
        cfg = load_config(path)
        cfg.resume, cfg.output = True, output
        trainer = loop.fit(cfg, env)
        result.update(final_lr=trainer.lr, log=lines)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        loop.Trainer.resume, loop.Trainer.train_step = resume, train_step
        root.removeHandler(handler)
        root.setLevel(level)
        shutdown_distributed()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """A 2-rank run stopped after its save at step 9; returns (config path, output folder).
    Every test that takes it is marked slow, so that only the slow tier trains it."""
    tmp_path = tmp_path_factory.mktemp("elastic")
    path, out = _config(tmp_path, **KW)
    spawn_ranks(_train_worker, path, world_size=2)
    assert torch.load(checkpoint_path(out, 1), weights_only=False)["global_step"] == SAVED_STEP
    return path, out


def _saved(out, world_size=2):
    return [torch.load(checkpoint_path(out, r), weights_only=False) for r in range(world_size)]


def _fc_rows(states):
    """Class centres and their momentum of the saved shards, concatenated by hand."""
    weight = torch.cat([s["state_dict_softmax_fc"]["weight"] for s in states])
    momentum = torch.cat(
        [
            s["state_optimizer"]["state"][max(s["state_optimizer"]["state"])]["momentum_buffer"]
            for s in states
        ]
    )
    return weight, momentum


def _as_written_by_older_otface(output):
    """Drop the keys that record the world size and schedule (and the checksums that no
    longer match): the world size is then inferred from the files."""
    for r in range(2):
        for path in (checkpoint_path(output, r), previous_checkpoint_path(output, r)):
            state = torch.load(path, weights_only=False)
            for key in ("world_size", "total_batch_size", "lr_schedule"):
                del state[key]
            torch.save(state, path)
            os.unlink(checksum_path(path))


@pytest.mark.slow
@pytest.mark.parametrize("world_size, legacy", [(1, False), (1, True), (3, False)])
def test_resume_on_another_world_size_reshards_exactly(two_rank_run, tmp_path, world_size, legacy):
    path, out = two_rank_run
    saved = _saved(out)
    weight, momentum = _fc_rows(saved)
    assert weight.shape == momentum.shape == (16, 512)
    saved_lr = saved[0]["state_optimizer"]["param_groups"][0]["lr"]
    output = str(tmp_path / "resumed")
    shutil.copytree(out, output)
    if legacy:
        _as_written_by_older_otface(output)
    if world_size == 1:
        _resume_worker(0, 1, None, path, output, str(tmp_path))
    else:
        spawn_ranks(_resume_worker, path, output, str(tmp_path), world_size=world_size)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]

    # Exactly the saved rows, split as at start-up (6, 5, 5 on 3 ranks).
    for r, res in enumerate(results):
        assert res["class_range"] == shard_range(16, rank=r, world_size=world_size)
    assert torch.equal(torch.cat([r["weight"] for r in results]), weight)
    assert torch.equal(torch.cat([r["momentum"] for r in results]), momentum)
    # The backbone is the saved one of the same rank (rank 0's for a new rank).
    for r, res in enumerate(results):
        ref = saved[min(r, 1) if r < 2 else 0]["state_dict_backbone"]
        assert all(torch.equal(res["backbone"][k], v) for k, v in ref.items())

    # Same step, same learning rate; the epoch continues at the same number of images.
    new_batch = IMAGES_INTO_EPOCH // (8 * world_size)
    steps_per_epoch = 96 // (8 * world_size)
    remaining = steps_per_epoch - new_batch
    for res in results:
        assert res["step"] == SAVED_STEP
        assert res["group_lrs"] == [saved_lr, saved_lr] and res["lr"] == saved_lr
        assert res["start"] == (1, new_batch)
        assert res["total_step"] == SAVED_STEP + remaining
        steps = [s for s, _ in res["steps"]]
        assert steps == list(range(SAVED_STEP + 1, SAVED_STEP + remaining + 1))
        lrs = [lr for _, lr in res["steps"]]
        assert lrs[0] == saved_lr  # the step after the checkpoint runs at its learning rate
        assert all(a > b > 0 for a, b in zip(lrs, lrs[1:]))
        assert res["final_lr"] == 0.0  # and the stretched schedule still ends at zero
    resharded = [line for line in results[0]["log"] if "resharded" in line]
    assert len(resharded) == 1, results[0]["log"]
    assert f"from 2 checkpoint files to {world_size} ranks at global step 9" in resharded[0]


def _global_batches(cls, world_size, epoch, **kw):
    per_rank = []
    for r in range(world_size):
        sampler = cls(**kw, rank=r, world_size=world_size, seed=3)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    return [sum((b[i] for b in per_rank), []) for i in range(len(per_rank[0]))]


@pytest.mark.parametrize("kind", ["uniform", "pk"])
@pytest.mark.parametrize("old, new", [(2, 1), (2, 3), (4, 3)])
def test_rederived_position_repeats_at_most_one_global_batch(kind, old, new):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(40), rng.integers(2, 9, 40))
    cls, kw = (
        (UniformBatchSampler, dict(num_samples=labels.size, batch_size=8))
        if kind == "uniform"
        else (PKBatchSampler, dict(labels=labels, batch_size=8, k=2))
    )
    before, after = _global_batches(cls, old, 1, **kw), _global_batches(cls, new, 1, **kw)
    for done in range(len(before)):
        ckpt = {"epoch": 1, "epoch_step": done, "global_step": len(before) + done}
        pos = resume_position(
            ckpt,
            saved_total_batch_size=8 * old,
            total_batch_size=8 * new,
            num_image=labels.size,
            num_epoch=2,
            warmup_epoch=0.5,
        )
        assert pos.epoch_step == min(done * old // new, len(after))
        if pos.epoch != 1:
            continue
        read = collections.Counter(sum(before[:done] + after[pos.epoch_step :], []))
        whole = collections.Counter(sum(after, []))
        repeated, skipped = sum((read - whole).values()), sum((whole - read).values())
        if kind == "uniform":  # one global order dealt to the ranks: exact but for rounding
            assert skipped == 0 and repeated == done * 8 * old - pos.epoch_step * 8 * new
        # P x K: the same order of groups, but for groups a step defers to the next one
        assert repeated < 8 * new and skipped < 8 * new
        assert pos.schedule.position(ckpt["global_step"]) == ckpt["global_step"]
        assert pos.schedule.end_step() == ckpt["global_step"] + len(after) - pos.epoch_step


@pytest.mark.slow
def test_merge_then_split_round_trips_bit_for_bit(two_rank_run, tmp_path):
    _, out = two_rank_run
    full_path = full_state.merge(out, str(tmp_path / "full.pt"))
    assert os.path.isfile(checksum_path(full_path))
    full = torch.load(full_path, weights_only=False)
    weight, momentum = _fc_rows(_saved(out))
    assert torch.equal(full["state_dict_softmax_fc"]["weight"], weight)
    fc_id = max(full["state_optimizer"]["state"])
    assert torch.equal(full["state_optimizer"]["state"][fc_id]["momentum_buffer"], momentum)

    back = tmp_path / "back"
    full_state.split(full_path, 2, str(back))
    for r in range(2):
        with (
            open(checkpoint_path(out, r), "rb") as a,
            open(back / f"checkpoint_gpu_{r}.pt", "rb") as b,
        ):
            assert a.read() == b.read(), r
    # Three ranks: the uneven split of the same rows.
    three = tmp_path / "three"
    assert full_state.main(["split", full_path, "--world-size", "3", "--output", str(three)]) == 0
    split3 = _saved(str(three), 3)
    got_weight, got_momentum = _fc_rows(split3)
    assert torch.equal(got_weight, weight) and torch.equal(got_momentum, momentum)
    assert [s["world_size"] for s in split3] == [3, 3, 3]


@pytest.mark.slow
def test_full_state_errors_name_the_file(two_rank_run, tmp_path, capsys):
    _, out = two_rank_run
    empty = tmp_path / "empty"
    empty.mkdir()
    assert full_state.main(["merge", str(empty)]) == 1
    assert f"no complete set of checkpoints in {empty}" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="no key 'full_state'"):
        full_state.split(checkpoint_path(out, 0), 2, str(tmp_path / "x"))
    full_path = full_state.merge(out, str(tmp_path / "full.pt"))
    with open(full_path, "r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 64)
    with pytest.raises(CheckpointError, match="full.pt: corrupt"):
        full_state.split(full_path, 2, str(tmp_path / "y"))


def test_a_stretched_schedule_is_kept_by_a_resume_on_the_same_ranks():
    # Resumed 2 -> 1 rank at step 9 (epoch 1, 48 images in); saved again at step 13.
    first = resume_position(
        {"epoch": 1, "epoch_step": 3, "global_step": 9},
        saved_total_batch_size=16,
        total_batch_size=8,
        num_image=96,
        num_epoch=2,
        warmup_epoch=0.5,
    )
    assert (first.epoch, first.epoch_step, first.schedule.end_step()) == (1, 6, 15)
    record = {"reference_total_batch_size": 16, **first.schedule.anchors()}
    ckpt = {"epoch": 1, "epoch_step": 10, "global_step": 13, "lr_schedule": record}
    again = resume_position(
        ckpt,
        saved_total_batch_size=8,
        total_batch_size=8,
        num_image=96,
        num_epoch=2,
        warmup_epoch=0.5,
    )
    assert again.schedule == first.schedule and again.note == ""
    # A longer run (num_epoch 3) re-anchors at step 13 with the same rate there.
    longer = resume_position(
        ckpt,
        saved_total_batch_size=8,
        total_batch_size=8,
        num_image=96,
        num_epoch=3,
        warmup_epoch=0.5,
    )
    assert longer.schedule.end_step() == 13 + 2 + 12
    assert longer.schedule.position(13) == pytest.approx(first.schedule.position(13))
