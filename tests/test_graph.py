"""The step as a CUDA graph (otface.train.graph, config.cuda_graph).

On the CPU: what a recorded forward relies on (per-step values through ``prepare_step``, the
gradients an optimiser step keeps) and which configs refuse it. On a GPU (``-m gpu``): a
graphed trainer against an eager one from the same weights on the same batches, with OTFace's
lambda still warming up while the graph replays.
"""

import copy
import importlib
import os

import pytest
import torch
from _tiny import TinyNet
from easydict import EasyDict as edict

from otface.config import ConfigError, load_config, validate_config
from otface.loss import lambda_at
from otface.registry import LOSSES
from otface.train.distributed import DistEnv
from otface.train.graph import StepGraph
from otface.train.guard import BufferSnapshot, SkipCounter
from otface.train.optim import optimizer_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore:sinkhorn did not reach")


_Tiny = TinyNet


def _base(**keys):
    cfg = copy.deepcopy(importlib.import_module("configs.base").config)
    cfg.update(keys)
    return cfg


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_prepare_step_then_forward_without_step_is_the_forward_of_that_step(step):
    cfg = _base(embedding_size=16, num_classes=12)
    cfg.otface.update(warmup_steps=4, lambda_ot=1.5, mining_margin=2.0)
    net = _Tiny()
    crit = LOSSES.build("otface", cfg, backbone=net, rank=0, world_size=1)
    x, labels = torch.randn(8, 3, 16, 16), torch.arange(8) // 2
    ref = crit(net(x), labels, step=step)
    crit.prepare_step(step)
    got = crit(net(x), labels, step=None)
    expected_lambda = lambda_at(step, lambda_ot=1.5, warmup_steps=4)
    assert got.metrics["lambda_ot"].item() == pytest.approx(expected_lambda, rel=1e-7)
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-7)
    assert ref.metrics["lambda_ot"].item() == pytest.approx(expected_lambda, rel=1e-7)
    # The lambda a replay would read is the tensor prepare_step fills: changing it changes the
    # loss of an unchanged forward (it is not a Python number baked in at call time).
    manual = crit(net(x), labels, step=None)
    total = manual.metrics["loss_margin"] + expected_lambda * manual.metrics["loss_ot"]
    assert manual.loss.item() == pytest.approx(total.item(), rel=1e-6)


def test_lambda_buffer_adds_nothing_to_the_state_dict():
    cfg = _base(embedding_size=16, num_classes=12)
    net = _Tiny()
    ot = LOSSES.build("otface", cfg, backbone=net, rank=0, world_size=1)
    arc = LOSSES.build("arcface", cfg, backbone=net, rank=0, world_size=1)
    assert list(ot.state_dict()) == list(arc.state_dict())
    arc.prepare_step(5)  # the margin criterion has nothing per step, but takes the call


def test_optimizer_step_keep_grads_leaves_the_gradients_where_they_are():
    net = _Tiny()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    kwargs = dict(
        grad_scaler=None, buffers=BufferSnapshot(net), skips=SkipCounter(max_consecutive=0)
    )
    for keep in (True, False):
        net(torch.randn(4, 3, 16, 16)).sum().backward()
        grads = [p.grad for p in net.parameters()]
        assert optimizer_step(opt, net, global_step=1, keep_grads=keep, **kwargs)
        after = [p.grad for p in net.parameters()]
        if keep:
            assert all(a is g for a, g in zip(after, grads))
        else:
            assert all(a is None for a in after)


def test_step_graph_refuses_a_cpu_batch_and_a_warmup_of_zero():
    net = _Tiny()
    with pytest.raises(ValueError, match="warmup"):
        StepGraph(lambda x, y: None, list(net.parameters()), warmup=0)
    graph = StepGraph(lambda x, y: None, list(net.parameters()))
    with pytest.raises(ValueError, match="CUDA batch"):
        graph(torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize(
    "keys,named",
    [
        (dict(compile=True), "'compile'"),
        (dict(gradient_acc=2), "'gradient_acc' = 2"),
        (dict(sample_rate=0.5), "'sample_rate' = 0.5"),
    ],
)
def test_cuda_graph_on_with_a_config_it_cannot_hold_is_refused(keys, named):
    cfg = _base(cuda_graph="on", **keys)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, source="job.py")
    assert "job.py" in str(err.value) and "'cuda_graph' = 'on'" in str(err.value)
    assert named in str(err.value)
    cfg.cuda_graph = "auto"  # auto: accepted, and off where it cannot run
    validate_config(cfg, source="job.py")


def test_cuda_graph_typo_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="'cuda_graph' = 'yes'.*'off', 'auto', 'on'"):
        validate_config(_base(cuda_graph="yes"), source="job.py")


def _demo_cfg(tmp_path, **keys):
    cfg = load_config(os.path.join(ROOT, "configs", "demo_otface"))
    cfg.update(rec="synthetic", num_classes=100, num_image=32 * 20, batch_size=32)
    cfg.update(output=str(tmp_path), sampler=edict(type="pk", k=4), **keys)
    cfg.otface.update(warmup_steps=6)
    return cfg


def test_cuda_graph_on_the_cpu(tmp_path):
    from otface.train.loop import Trainer

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="'cuda_graph' = 'on'.*need CUDA"):
        Trainer(_demo_cfg(tmp_path, cuda_graph="on"), env)
    trainer = Trainer(_demo_cfg(tmp_path, cuda_graph="auto"), env)
    assert trainer.step_graph is None  # auto: off on the CPU, and the step runs as before
    labels = torch.arange(8).repeat_interleave(4)
    out = trainer.train_step(torch.rand(32, 3, 112, 112) * 2 - 1, labels)
    assert torch.isfinite(out.loss)


# -- on a GPU ---------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _train(cfg, batches, *, deterministic: bool):
    from otface.train import loop

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0))
    loop.seed_everything(cfg.seed)
    trainer = loop.Trainer(cfg, env)
    trainer.backbone.train()
    trainer.start_weights = _flat_weights(trainer.backbone)
    outs = []
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    try:
        for img, labels in batches:
            out = trainer.train_step(img.cuda(), labels.cuda())
            outs.append(out)
    finally:
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = False
    if hasattr(trainer.criterion, "remove_hook"):
        trainer.criterion.remove_hook()
    return trainer, outs


def _flat_weights(module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in module.parameters()])


def _update(trainer) -> torch.Tensor:
    """How far training moved the backbone's parameters."""
    return _flat_weights(trainer.backbone) - trainer.start_weights


def _batches(n, batch=32, size=112):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        labels = torch.randperm(100, generator=g)[: batch // 4].repeat_interleave(4)
        out.append((torch.rand(batch, 3, size, size, generator=g) * 2 - 1, labels))
    return out


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("loss", ["arcface", "otface"])
def test_graphed_training_follows_eager_training(tmp_path, loss, fp16):
    batches = _batches(10)
    cfg = _demo_cfg(tmp_path, loss=loss, fp16=fp16)
    eager, ref = _train(cfg, batches, deterministic=not fp16)
    # A second eager run measures the run-to-run noise (atomics in index_add and cuDNN's fp16
    # kernels; OTFace's Sinkhorn stops at tol 1e-3, so a tiny difference can change where).
    again, _ = _train(_demo_cfg(tmp_path, loss=loss, fp16=fp16), batches, deterministic=not fp16)
    graphed_cfg = _demo_cfg(tmp_path, loss=loss, fp16=fp16, cuda_graph="on")
    graphed, got = _train(graphed_cfg, batches, deterministic=not fp16)
    graph = graphed.step_graph
    assert graph is not None and graph.failed is None and graph.replaying
    assert graph.calls == len(batches)
    tol = 2e-2 if fp16 else 1e-4
    for step, (r, g) in enumerate(zip(ref, got), start=1):
        assert g.loss.item() == pytest.approx(r.loss.item(), rel=tol), f"step {step}"
        if loss == "otface":
            # lambda still warms up while the graph replays (steps 5-6 of warmup_steps 6)
            lam = lambda_at(step, lambda_ot=cfg.otface.lambda_ot, warmup_steps=6)
            assert g.metrics["lambda_ot"].item() == pytest.approx(lam, rel=1e-6)
            assert g.metrics["n_hard"].item() == r.metrics["n_hard"].item()
    # Outputs are copies: the first replay's loss was not overwritten by the later ones.
    assert got[4].loss.item() != got[-1].loss.item()
    # Ten steps of training moved the weights as eager training does, within the eager runs'
    # own spread (with a floor for runs that are bitwise repeatable).
    ref_update = _update(eager)
    noise = (_update(again) - ref_update).norm()
    off = (_update(graphed) - ref_update).norm()
    assert off <= 4 * noise + 2e-3 * ref_update.norm(), (off, noise, ref_update.norm())
    assert eager.skipped_steps == graphed.skipped_steps


@pytest.mark.gpu
@needs_cuda
def test_a_batch_of_another_shape_runs_eagerly_into_the_graph_gradients(tmp_path):
    batches = _batches(6)
    odd = _batches(1, batch=16)
    seq = batches[:5] + odd + batches[5:]
    _, ref = _train(_demo_cfg(tmp_path), seq, deterministic=True)
    graphed, got = _train(_demo_cfg(tmp_path, cuda_graph="on"), seq, deterministic=True)
    assert graphed.step_graph.replaying
    for r, g in zip(ref, got):
        assert g.loss.item() == pytest.approx(r.loss.item(), rel=1e-4)
