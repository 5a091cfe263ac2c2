"""CUDA twins of CPU-tested paths: the same numbers on the GPU (skipped without CUDA).

Run on a GPU machine with ``python -m pytest -m gpu tests/test_gpu.py`` (or
``bash benchmarks/gpu_check.sh``, which also runs the benchmarks).
"""

import os

import pytest
import torch
from easydict import EasyDict as edict

from otface.config import load_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_sinkhorn_cuda_equals_cpu():
    from otface.ot import cosine_cost, sinkhorn

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 49, 32, generator=g), torch.randn(64, 49, 32, generator=g)
    ref = sinkhorn(cosine_cost(x, y), eps=0.05, max_iter=50, tol=1e-6)
    got = sinkhorn(cosine_cost(x.cuda(), y.cuda()), eps=0.05, max_iter=50, tol=1e-6)
    assert torch.allclose(got.plan.cpu(), ref.plan, atol=1e-5)
    assert torch.allclose(got.cost.cpu(), ref.cost, atol=1e-5)


def test_sinkhorn_fp32_under_autocast_on_cuda():
    from otface.ot import cosine_cost, sinkhorn

    x = torch.randn(8, 49, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        res = sinkhorn(cosine_cost(x.half(), x.half()), eps=0.05, max_iter=50, tol=1e-3)
    assert res.plan.dtype == torch.float32 and torch.isfinite(res.cost).all()


def test_partial_fc_cuda_equals_cpu():
    from otface.margin import CombinedMarginLoss
    from otface.partial_fc import PartialFC

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(16, 32, generator=g)
    labels = torch.randint(0, 40, (16,), generator=g)
    losses = []
    for device in ("cpu", "cuda"):
        pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 32, 40, seed=3).to(device)
        losses.append(float(pfc(emb.to(device), labels.to(device))))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def _cfg(tmp_path, loss):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "demo_otface"))
    cfg.update(
        loss=loss,
        network="r50",
        fp16=True,
        rec="synthetic",
        num_classes=1000,
        num_image=64 * 10,
        batch_size=64,
        output=str(tmp_path),
        sampler=edict(type="pk", k=4),
    )
    return cfg


@pytest.mark.parametrize("loss", ["arcface", "otface"])
def test_fp16_training_steps_on_cuda(tmp_path, loss):
    from otface.train import loop
    from otface.train.distributed import DistEnv

    cfg = _cfg(tmp_path, loss)
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0))
    loop.seed_everything(cfg.seed)
    trainer = loop.Trainer(cfg, env)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(16).repeat_interleave(4)
    losses = []
    for _ in range(5):
        img = torch.rand(64, 3, 112, 112, generator=g) * 2 - 1
        out = trainer.train_step(img, labels)
        losses.append(out.loss.item())
        assert all(torch.isfinite(v).all() for v in out.metrics.values())
    assert all(map(lambda v: v == v and abs(v) < 1e4, losses))
    if loss == "otface":
        assert out.metrics["n_hard"].item() > 0
