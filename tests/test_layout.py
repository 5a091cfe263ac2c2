"""channels_last (NHWC) memory layout: the config key, the backbone's state_dict and outputs, the
hooked feature map and the OT term, and the trainer's first step — all unchanged by the layout."""

from __future__ import annotations

import io
import os

import pytest
import torch
from _jobs import write_job

from otface.backbones import get_model, use_channels_last
from otface.config import ConfigError, load_config, validate_config
from otface.data.datasets import normalize_images
from otface.hooks import FeatureCapture
from otface.loss import hard_triplet_ot_loss
from otface.train import loop
from otface.train.distributed import DistEnv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CL = torch.channels_last


def _pair(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same network twice: NCHW and channels_last, equal weights, eval mode."""
    torch.manual_seed(seed)
    plain = get_model(name).eval()
    nhwc = get_model(name).eval()
    nhwc.load_state_dict(plain.state_dict())
    nhwc.to(memory_format=CL)
    return plain, nhwc


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def _assert_equal_to_rounding(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5):
    # Relative to the output's scale: r18_lite's untrained embeddings reach ~16, mbf's ~3e-6,
    # and a different conv algorithm changes the float32 rounding, not the result.
    err = (actual - expected).abs().max().item()
    assert err <= tol * expected.abs().max().item(), (err, expected.abs().max().item())


def test_use_channels_last_resolution():
    assert use_channels_last("auto", torch.device("cuda")) is True
    assert use_channels_last("auto", torch.device("cuda", 1)) is True
    assert use_channels_last("auto", torch.device("cpu")) is False
    assert use_channels_last(True, torch.device("cpu")) is True
    assert use_channels_last(False, torch.device("cuda")) is False
    with pytest.raises(ValueError, match=r"'yes'.*|.*'auto', True, False"):
        use_channels_last("yes", torch.device("cpu"))


@pytest.mark.parametrize("name", ["r18_lite", "mbf"])
def test_state_dict_keys_shapes_values_identical(name):
    plain, nhwc = _pair(name)
    conv_w = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv_w and all(w.is_contiguous(memory_format=CL) for w in conv_w)
    a, b = plain.state_dict(), nhwc.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", ["r18_lite", "mbf"])
def test_channels_last_checkpoint_loads_strict_into_plain_model(name):
    _, nhwc = _pair(name)
    buf = io.BytesIO()
    torch.save(nhwc.state_dict(), buf)  # what model.pt / checkpoints hold
    buf.seek(0)
    fresh = get_model(name).eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    conv = next(m for m in fresh.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()  # the plain model keeps its own layout
    x = _images()
    with torch.no_grad():
        _assert_equal_to_rounding(fresh(x), nhwc(x))


@pytest.mark.parametrize("name", ["r18_lite", "mbf"])
def test_outputs_equal_in_either_layout(name):
    plain, nhwc = _pair(name)
    x = _images()
    with torch.no_grad():
        ref = plain(x)
        _assert_equal_to_rounding(nhwc(x.contiguous(memory_format=CL)), ref)
        _assert_equal_to_rounding(nhwc(x), ref)


def test_normalize_images_keeps_channels_last():
    pixels = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    out = normalize_images(pixels.contiguous(memory_format=CL))
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, pixels.double().div(255).sub(0.5).div(0.5).float())


def test_hooked_map_and_ot_term_unchanged_by_layout():
    plain, nhwc = _pair("r18_lite")
    x = _images(8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    maps, embs = [], []
    for model, inp in ((plain, x), (nhwc, x.contiguous(memory_format=CL))):
        with FeatureCapture(model) as cap, torch.no_grad():
            embs.append(model(inp))
            maps.append(cap.pop())
    assert maps[0].shape == maps[1].shape == (8, 128, 7, 7)
    assert maps[1].is_contiguous(memory_format=CL) and not maps[1].is_contiguous()
    _assert_equal_to_rounding(maps[1], maps[0])
    # The same embeddings for both, so that both mine the same triplets; a large mining margin
    # makes every anchor hard and the OT term run on all of them.
    kw = dict(mining_margin=2.0, variant="pull", solver="torch", max_iter=200, tol=1e-6)
    out = [hard_triplet_ot_loss(m, embs[0], labels, **kw) for m in maps]
    assert float(out[0].metrics["n_hard"]) == 8.0
    assert float(out[0].loss) > 0
    torch.testing.assert_close(out[1].loss, out[0].loss, atol=1e-5, rtol=1e-5)
    # The OT term reads (B, H*W, C) points with flatten(2).transpose(1, 2); on NHWC strides that
    # must give the points an independent, element-by-element read gives (a .view would fail).
    nhwc_map = maps[1]
    points = torch.stack([nhwc_map[:, c].reshape(8, 49) for c in range(128)], dim=2)
    assert torch.equal(nhwc_map.flatten(2).transpose(1, 2), points)
    assert points[3, 2 * 7 + 5, 17] == nhwc_map[3, 17, 2, 5]
    with pytest.raises(RuntimeError):
        nhwc_map.view(8, 128 * 49)


def _cfg(tmp_path, channels_last):
    name = f"layout_{channels_last}"
    keys = {
        "network": "r18_lite",
        "rec": "synthetic",
        "loss": "otface",
        "num_classes": 4,
        "batch_size": 8,
        "num_image": 32,
        "num_epoch": 1,
        "lr": 0.05,
        "val_targets": [],
        "num_workers": 0,
        "channels_last": channels_last,
        "sampler": {"type": "pk", "k": 2},
        "otface": {"mining_margin": 2.0},
        "output": str(tmp_path / name),
    }
    return load_config(write_job(tmp_path, name, keys))


def test_config_key_validated(tmp_path):
    assert _cfg(tmp_path, "auto").channels_last == "auto"
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match="channels_last"):
            _cfg(tmp_path, bad)


@pytest.mark.slow
def test_trainer_steps_with_layout_on_and_off(tmp_path):
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (8, 3, 112, 112), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    results = {}
    for setting in (False, True, "auto"):
        cfg = _cfg(tmp_path, setting)
        loop.seed_everything(cfg.seed)
        trainer = loop.Trainer(cfg, env)
        conv_w = trainer.backbone.conv1.weight
        assert trainer.channels_last is (setting is True)
        assert conv_w.is_contiguous(memory_format=CL) is (setting is True)
        first = trainer.train_step(pixels, labels)
        second = trainer.train_step(pixels, labels)
        assert float(first.metrics["n_hard"]) > 0  # the OT term ran through the hooked map
        results[setting] = (first.loss.item(), second.loss.item(), trainer.backbone.state_dict())
    off, on, auto = results[False], results[True], results["auto"]
    assert on[0] == pytest.approx(off[0], abs=1e-5)
    assert on[1] == pytest.approx(off[1], abs=1e-4)
    # "auto" is NCHW on the CPU (asserted above); after the NHWC run in between, oneDNN may
    # pick other CPU kernels, so equal to rounding rather than bit for bit.
    assert auto[:2] == pytest.approx(off[:2], abs=1e-5)
    assert list(on[2]) == list(off[2])
    for key in off[2]:
        torch.testing.assert_close(on[2][key], off[2][key], atol=1e-4, rtol=1e-4)


def test_compile_key_keeps_the_state_dict_and_is_validated(tmp_path):
    # Module.compile() works in place: no "_orig_mod." prefix in model.pt or checkpoints, and
    # the module the feature hook sits on is the same. (The compilation itself happens at the
    # first forward, which benchmarks/gpu_check.sh times on a GPU.)
    net = get_model("r18_lite")
    keys = list(net.state_dict())
    for scope in ("blocks", "network"):
        loop.compile_backbone(net, "max-autotune", scope)
        assert list(net.state_dict()) == keys
    cfg = _cfg(tmp_path, False)
    assert cfg.compile is False and cfg.compile_scope == "blocks"
    for bad in ("fast", 1):
        cfg.compile = bad
        with pytest.raises(ConfigError, match="compile"):
            validate_config(cfg)
    cfg.compile = True
    for bad in ("block", "whole", True):
        cfg.compile_scope = bad
        with pytest.raises(ConfigError, match="compile_scope"):
            validate_config(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["network", "blocks"])
def test_otface_feature_hook_is_traced_by_torch_compile(scope):
    # The trainer compiles the backbone in place and only then builds the criterion, whose
    # forward hook on the last feature map must be traced into the compiled graph (scope
    # "network") or run around the compiled blocks (scope "blocks"): otherwise the OT term
    # silently sees no map (or a stale one). Dynamo's tracing is what decides this; the
    # "aot_eager" backend keeps it to seconds on a CPU (Inductor's code generation is what
    # benchmarks/gpu_check.sh times on a GPU). Reference: the same weights, not compiled.
    import copy as _copy

    import torch._dynamo

    from otface.registry import LOSSES

    cfg = load_config(os.path.join(ROOT, "configs", "demo_otface"))
    cfg.update(num_classes=8, fp16=False)
    torch.manual_seed(0)
    eager = get_model("r18_lite", num_features=cfg.embedding_size)
    compiled = _copy.deepcopy(eager)
    loop.compile_backbone(compiled, True, scope, backend="aot_eager")
    images = _images(16, seed=3)
    labels = torch.arange(4).repeat_interleave(4)
    results = []
    torch._dynamo.reset()
    for net in (eager, compiled):
        net.train()
        criterion = LOSSES.build("otface", cfg, backbone=net, rank=0, world_size=1)
        with torch.random.fork_rng():
            torch.manual_seed(5)
            out = criterion(net(images), labels, step=1)
        out.loss.backward()
        grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
        results.append((out, grads))
        criterion.remove_hook()
    (ref, ref_grads), (got, got_grads) = results
    assert float(ref.metrics["n_hard"]) > 0, "the batch must mine something to compare"
    assert float(ref.metrics["loss_ot"]) > 0
    for key in ("n_hard", "loss_ot", "loss_margin"):
        assert float(got.metrics[key]) == pytest.approx(float(ref.metrics[key]), rel=1e-4, abs=1e-6)
    assert len(got_grads) == len(ref_grads)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3)
    if scope == "network":
        # One graph, no breaks: a break at the hook would run the rest uncompiled.
        explained = torch._dynamo.explain(_copy.deepcopy(eager).train())(images)
        assert explained.graph_break_count == 0, explained.break_reasons


@pytest.fixture
def dynamo_defaults():
    """Dynamo's default recompile limit and hook guards, restored after the test (the
    trainer's compile_backbone changes both for the process), and its graph counter, zeroed."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    with torch._dynamo.config.patch(recompile_limit=8, skip_nnmodule_hook_guards=True):
        torch._dynamo.reset()
        counters.clear()
        yield counters


def _small_iresnet_compiled_by_blocks(layers):
    """A narrow IResNet with ``layers`` blocks per stage, and a copy with scope "blocks"
    (aot_eager backend: Dynamo's tracing, no code generation); also what compile_backbone
    said it compiled."""
    import copy as _copy

    from otface.backbones.iresnet import IResNet

    torch.manual_seed(0)
    eager = IResNet(layers, widths=(4, 8, 8, 16), num_features=16).train()
    compiled = _copy.deepcopy(eager)
    described = loop.compile_backbone(compiled, True, "blocks", backend="aot_eager")
    return eager, compiled, described


@pytest.mark.slow
def test_compile_blocks_share_one_graph_per_block_shape(dynamo_defaults):
    # Scope "blocks" compiles the stem and every residual block on its own. An IResNet has at
    # most eight block shapes (the first and the other blocks of four stages), so r34's layout
    # (3, 4, 6, 3), 16 blocks, must cost eight block graphs plus the stem's: that is what keeps
    # r100's compile time that of r18. Dynamo counts the graphs it builds (aot_eager backend:
    # no code generation). Then evaluation under eager_stance (the trainer's verification)
    # compiles nothing more, and every output and gradient equals the uncompiled network's.
    import torch._dynamo

    counters = dynamo_defaults
    eager, compiled, described = _small_iresnet_compiled_by_blocks((3, 4, 6, 3))
    assert described.startswith("17 regions")
    assert torch._dynamo.config.recompile_limit >= 17  # room for every region
    assert list(compiled.state_dict()) == list(eager.state_dict())
    images = _images(4, seed=5)
    outs, grads = [], []
    for net in (eager, compiled):
        out = net(images)
        out.square().sum().backward()
        outs.append(out)
        grads.append([p.grad for p in net.parameters() if p.grad is not None])
    assert counters["stats"]["unique_graphs"] == 9
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert len(grads[1]) == len(grads[0]) > 0
    for g, r in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    eager.eval(), compiled.eval()
    with torch.no_grad(), loop.eager_stance():
        evaluated = compiled(images)
    assert counters["stats"]["unique_graphs"] == 9
    torch.testing.assert_close(evaluated, eager(images).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_feature_hook_inside_a_compiled_block_fires(dynamo_defaults):
    # config otface.layer may name a module inside a residual block. Scope "blocks" compiles
    # identical blocks once; Dynamo, by default blind to module hooks, would run the hooked
    # block with the graph of its hook-less twin (compiled first), and the OT term would get no
    # map. compile_backbone turns hook guards on: the hooked block gets a graph of its own.
    counters = dynamo_defaults
    eager, compiled, _ = _small_iresnet_compiled_by_blocks((1, 3, 1, 1))
    images = _images(2, seed=6)
    maps = []
    for net in (eager, compiled):
        with FeatureCapture(net, "layer2.2.bn3") as cap:
            net(images)
            maps.append(cap.pop())
    assert maps[1] is not None, "the hook inside the compiled block did not fire"
    torch.testing.assert_close(maps[1], maps[0], atol=1e-5, rtol=1e-5)
    # stem, 4 first blocks, layer2's two other blocks (hooked and not): 7 graphs
    assert counters["stats"]["unique_graphs"] == 7


def test_fused_bn_prelu_key_switches_the_blocks_and_is_validated(tmp_path):
    # The numbers of the fused op are checked in test_fused_bn_prelu.py; here, the key: every
    # IResNet block is switched, the step still runs ("auto" on the CPU runs the modules), and
    # the state_dict keys do not change.
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    cfg = _cfg(tmp_path, False)
    assert cfg.fused_bn_prelu == "off"
    plain = loop.Trainer(cfg, env)
    cfg.fused_bn_prelu = "auto"
    validate_config(cfg)
    fused = loop.Trainer(cfg, env)
    blocks = [m for m in fused.backbone.modules() if type(m).__name__ == "IBasicBlock"]
    assert blocks and all(b.fused_bn_prelu == "auto" for b in blocks)
    assert fused.backbone.fused_bn_prelu == "auto"  # the stem
    assert all(
        m.fused_bn_prelu == "off"
        for m in plain.backbone.modules()
        if type(m).__name__ == "IBasicBlock"
    )
    assert list(fused.backbone.state_dict()) == list(plain.backbone.state_dict())
    out = fused.train_step(
        torch.randint(0, 256, (8, 3, 112, 112), dtype=torch.uint8),
        torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
    )
    assert torch.isfinite(out.loss)
    for bad in ("on", True, "torch"):
        cfg.fused_bn_prelu = bad
        with pytest.raises(ConfigError, match="fused_bn_prelu"):
            validate_config(cfg)
    cfg.fused_bn_prelu, cfg.compile = "auto", "default"
    with pytest.raises(ConfigError, match="'compile' = 'default' and 'fused_bn_prelu' = 'auto'"):
        validate_config(cfg)
    cfg.compile = False
    cfg.network = "mbf"
    with pytest.warns(UserWarning, match="no IResNet block"):
        loop.Trainer(cfg, env)


def test_compile_first_step_time_is_logged_once(tmp_path, monkeypatch, caplog):
    # The compilation itself is timed on a GPU (gpu_check.sh); here, that train.py tells the
    # user what the first step cost, once. compile_backbone is replaced, so no compiler runs.
    calls = []
    monkeypatch.setattr(
        loop, "compile_backbone", lambda net, mode, scope: calls.append(mode) or "the stand-in"
    )
    cfg = _cfg(tmp_path, False)
    cfg.compile = "default"
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with caplog.at_level("INFO"):
        loop.fit(cfg, env)
    lines = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert calls == ["default"]
    assert len(lines) == 1 and "first step took" in lines[0]
    assert "mode default, the stand-in" in lines[0]
