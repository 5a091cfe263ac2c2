"""Trainer: a short run writes arcface_torch's outputs, resume continues at the saved step with
the same learning rate, and 2 ranks over gloo give the losses of 1 process on the same batch."""

import os
import shutil
import signal
import subprocess

import pytest
import torch
import torch.multiprocessing as mp
from _jobs import TINY_RUN, write_job
from _spawn import free_port, join_gloo, run_train, spawn_ranks, start_train

from otface.config import load_config
from otface.train import loop
from otface.train.checkpoint import load_checkpoint
from otface.train.distributed import DistEnv, shutdown_distributed


def _config(tmp_path, *, num_image=96, num_epoch=2, save_every=5, name="tiny"):
    out = str(tmp_path / "work_dirs" / name)
    keys = {
        **TINY_RUN,
        "num_classes": 16,
        "num_image": num_image,
        "num_epoch": num_epoch,
        "warmup_epoch": 0.5,
        "save_every_steps": save_every,
        "save_all_states": True,
        "sampler": {"type": "uniform"},
        "output": out,
    }
    return write_job(tmp_path, name, keys), out


def _hand_lr(step_index, *, base, warmup, total):
    """LR used by the batch after `step_index` finished batches (linear warm-up, linear decay)."""
    if step_index < warmup:
        return base * (step_index + 1) / warmup
    return base * (1 - (step_index - warmup) / (total - warmup))


class _Stop(Exception):
    pass


_ORIGINAL_STEP = loop.Trainer.train_step


def _record_steps(monkeypatch, record, stop_at=None):
    original = _ORIGINAL_STEP

    def wrapped(self, img, labels):
        if stop_at is not None and self.global_step + 1 == stop_at:
            raise _Stop()
        lr_used = self.lr
        out = original(self, img, labels)
        record.append((self.global_step, lr_used, out.loss.item()))
        return out

    monkeypatch.setattr(loop.Trainer, "train_step", wrapped)


def _env():
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.mark.slow
def test_short_run_writes_outputs_and_follows_schedule(tmp_path, monkeypatch):
    path, out = _config(tmp_path)
    cfg = load_config(path)
    os.makedirs(out, exist_ok=True)
    record = []
    _record_steps(monkeypatch, record)
    loop.fit(cfg, _env())
    steps = [s for s, _, _ in record]
    assert steps == list(range(1, 25))  # 96 // 8 = 12 steps per epoch, 2 epochs
    for s, lr, _ in record:
        assert lr == pytest.approx(_hand_lr(s - 1, base=0.05, warmup=6, total=24), abs=1e-12)
    assert os.path.isfile(os.path.join(out, "model.pt"))
    assert os.path.isdir(os.path.join(out, "tensorboard"))
    state = torch.load(os.path.join(out, "model.pt"))
    assert "bn2.weight" in state and not any(k.startswith("weight") for k in state)


@pytest.mark.slow
def test_resume_continues_at_saved_step_with_same_lr(tmp_path, monkeypatch):
    path, out = _config(tmp_path)
    os.makedirs(out, exist_ok=True)
    full = []
    _record_steps(monkeypatch, full)
    loop.fit(load_config(path), _env())

    shutil.rmtree(out)
    os.makedirs(out)
    first = []
    _record_steps(monkeypatch, first, stop_at=14)  # "killed" while computing step 14
    with pytest.raises(_Stop):
        loop.fit(load_config(path), _env())
    ckpt = load_checkpoint(os.path.join(out, "checkpoint_gpu_0.pt"))
    assert ckpt["global_step"] == 12  # end of epoch 0 (save_every_steps=5 saved 5 and 10 before)

    resumed = []
    _record_steps(monkeypatch, resumed)
    cfg = load_config(path)
    cfg.resume = True
    loop.fit(cfg, _env())
    assert [s for s, _, _ in resumed] == list(range(13, 25))
    full_lr = {s: lr for s, lr, _ in full}
    for s, lr, _ in resumed:
        assert lr == pytest.approx(full_lr[s], abs=1e-12)


def test_resume_mid_epoch_from_save_every_steps(tmp_path, monkeypatch):
    path, out = _config(tmp_path, num_epoch=1)
    os.makedirs(out, exist_ok=True)
    first = []
    _record_steps(monkeypatch, first, stop_at=8)
    with pytest.raises(_Stop):
        loop.fit(load_config(path), _env())
    assert load_checkpoint(os.path.join(out, "checkpoint_gpu_0.pt"))["global_step"] == 5
    resumed = []
    _record_steps(monkeypatch, resumed)
    cfg = load_config(path)
    cfg.resume = True
    loop.fit(cfg, _env())
    assert [s for s, _, _ in resumed] == list(range(6, 13))
    assert resumed[0][1] == pytest.approx(_hand_lr(5, base=0.05, warmup=6, total=12), abs=1e-12)


@pytest.mark.slow
def test_sigkill_then_resume_finishes(tmp_path):
    path, out = _config(tmp_path, num_image=8 * 24, num_epoch=1, save_every=3)
    ckpt_file = os.path.join(out, "checkpoint_gpu_0.pt")
    proc = start_train(
        path, wait_for=ckpt_file, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = load_checkpoint(ckpt_file)["global_step"]  # intact whatever the moment of the kill
    with open(path + ".py", "a") as f:
        f.write("config.resume = True\n")
    done = run_train(path, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = open(os.path.join(out, "training.log")).read()
    assert f"global step {saved}," in log
    assert "finished: 24 steps" in log


# -- 2 ranks over gloo vs 1 process ---------------------------------------------------------


class _PerRankForward(torch.nn.Module):
    """1-process reference for DDP: BatchNorm statistics are per rank, so forward the global
    batch in the same per-rank chunks and concatenate."""

    def __init__(self, backbone, chunks):
        super().__init__()
        self.backbone = backbone
        self.chunks = chunks

    def forward(self, x):
        return torch.cat([self.backbone(c) for c in x.chunk(self.chunks)])


def _batches(steps, global_batch, num_classes):
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.rand(global_batch, 3, 112, 112, generator=g) * 2 - 1,
            torch.randint(0, num_classes, (global_batch,), generator=g),
        )
        for _ in range(steps)
    ]


def _ddp_cfg(path, batch_size):
    cfg = load_config(path)
    cfg.batch_size = batch_size
    cfg.num_image = 10000
    return cfg


def _ddp_worker(rank, world_size, port, path, result_file, compile_scope=None):
    env = join_gloo(rank, world_size, port)
    cfg = _ddp_cfg(path, 4)
    if compile_scope:
        # config.compile through the trainer (in place, inside DDP), with Dynamo's tracing
        # and AOTAutograd's compiled backward but no code generation, to keep it to seconds.
        cfg.compile, cfg.compile_scope = "default", compile_scope
        real = loop.compile_backbone
        loop.compile_backbone = lambda net, mode, scope: real(net, True, scope, backend="aot_eager")
    loop.seed_everything(cfg.seed)
    trainer = loop.Trainer(cfg, env)
    assert bool(trainer.compiled) is bool(compile_scope)
    losses = []
    for img, labels in _batches(3, 8, cfg.num_classes):
        sl = slice(4 * rank, 4 * rank + 4)
        losses.append(trainer.train_step(img[sl], labels[sl]).loss.item())
    if rank == 0:
        torch.save(losses, result_file)
    shutdown_distributed()


def _one_process_losses(path):
    """The losses of the 2-rank runs' three steps, from one process with the global batch."""
    cfg = _ddp_cfg(path, 8)
    loop.seed_everything(cfg.seed)
    trainer = loop.Trainer(cfg, _env())
    trainer.model = _PerRankForward(trainer.backbone, 2)
    return [trainer.train_step(img, labels).loss.item() for img, labels in _batches(3, 8, 16)]


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    path, _ = _config(tmp_path)
    result = str(tmp_path / "losses.pt")
    mp.spawn(_ddp_worker, args=(2, free_port(), path, result), nprocs=2, join=True)
    ddp_losses = torch.load(result)

    ref = _one_process_losses(path)
    assert ddp_losses == pytest.approx(ref, abs=1e-4)
    assert ref[0] != pytest.approx(ref[2], abs=1e-4)  # the steps did train


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "network"])
def test_two_compiled_ranks_equal_one_process(tmp_path, scope):
    # A compiled backward hands DDP its gradients at the end of each compiled region (each
    # block, or the whole network) rather than one by one: the all-reduced gradients, hence
    # the later steps' losses, must still be those of one process.
    path, _ = _config(tmp_path)
    result = str(tmp_path / "losses.pt")
    spawn_ranks(_ddp_worker, path, result, scope, timeout_s=240)
    ddp_losses = torch.load(result)
    ref = _one_process_losses(path)
    assert ddp_losses == pytest.approx(ref, abs=1e-4)
    assert ref[0] != pytest.approx(ref[2], abs=1e-4)


def test_nonfinite_batch_skips_the_update(tmp_path):
    path, _ = _config(tmp_path)
    cfg = load_config(path)
    loop.seed_everything(cfg.seed)
    trainer = loop.Trainer(cfg, _env())
    before = {
        k: v.clone() for k, v in trainer.backbone.state_dict().items() if v.is_floating_point()
    }
    img = torch.zeros(8, 3, 112, 112)
    img[3] = float("nan")
    trainer.train_step(img, torch.arange(8))
    assert trainer.skipped_steps == 1
    after = trainer.backbone.state_dict()
    for k, v in before.items():
        if "running" not in k:  # BatchNorm statistics are not optimiser state
            assert torch.equal(after[k], v), k
    g = torch.Generator().manual_seed(0)
    trainer.train_step(torch.rand(8, 3, 112, 112, generator=g), torch.arange(8))
    assert trainer.skipped_steps == 1


# -- fp16 loss scaler: a rank-local Inf makes every rank skip ---------------------------------


def _scaler_worker(rank, world_size, port, distributed, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        # One "sharded" parameter whose gradient is not all-reduced (as Partial FC's
        # centres); only rank 1 gets an Inf in it.
        param = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([param], lr=0.1)
        scaler = loop.build_grad_scaler("cpu", distributed=distributed)
        coeff = torch.full((3,), float("inf") if rank == 1 else 1.0)
        scaler.scale((param * coeff).sum()).backward()
        scale_before = scaler.get_scale()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        stepped = not torch.equal(param.detach(), torch.ones(3))
        torch.save((stepped, scaler.get_scale() / scale_before), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("distributed", [True, False])
def test_grad_scaler_skips_on_every_rank_when_one_rank_overflows(tmp_path, distributed):
    spawn_ranks(_scaler_worker, distributed, str(tmp_path), timeout_s=120)
    for r in range(2):
        assert (tmp_path / f"rank{r}.pt").is_file(), f"rank {r} failed before saving its result"
    stepped0, ratio0 = torch.load(tmp_path / "rank0.pt")
    stepped1, ratio1 = torch.load(tmp_path / "rank1.pt")
    assert stepped1 is False and ratio1 == 0.5  # the overflowing rank skips and backs off
    if distributed:
        # What the trainer builds with a process group: rank 0 skips too, same scale.
        assert stepped0 is False and ratio0 == 0.5
    else:
        # A plain GradScaler (the single-process choice) lets the replicas diverge.
        assert stepped0 is True and ratio0 == 1.0


def test_uint8_batch_is_normalised_on_the_device(tmp_path):
    # CUDA runs get uint8 batches from the loader; the step must see (x / 255 - 0.5) / 0.5.
    path, _ = _config(tmp_path)
    cfg = load_config(path)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (8, 3, 112, 112), dtype=torch.uint8, generator=g)
    labels = torch.arange(8)
    losses = []
    for img in (pixels, (pixels.double() / 255 - 0.5) / 0.5):
        loop.seed_everything(cfg.seed)
        trainer = loop.Trainer(cfg, _env())
        losses.append(trainer.train_step(img.float() if img.is_floating_point() else img, labels))
    assert losses[0].loss.item() == pytest.approx(losses[1].loss.item(), rel=1e-5)
