"""The backbones beyond the IResNets and mbf: r2060, mbf_large and the ViT family.

The layouts are pinned by facts, not by the code's own output: key lists and shapes written
here from the constructor arguments, parameter counts by formula, and fingerprints measured
once on arcface_torch. With an arcface_torch checkout (``ARCFACE_TORCH``, else
``.upstream/recognition/arcface_torch`` in this repository; skipped without one) its modules
are loaded too: strict ``state_dict`` round trips and equal embeddings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch
from _scripts import load_file
from torch import nn

import otface.backbones.vit as vit_mod
from otface.backbones import IResNet, VisionTransformer, get_model
from otface.backbones.vit import drop_path
from otface.export import check_onnx_parity, export_onnx

ROOT = Path(__file__).resolve().parents[1]

# Measured on arcface_torch's get_model(name, dropout=0.0, fp16=False, num_features=512):
# (tensors in state_dict, total numel incl. buffers, sha256[:16] of "key:shape" lines).
UPSTREAM_FACTS = {
    "r2060": (18583, 1_123_792_345, "0a2b341f55be062f"),
    "mbf": (333, 2_083_378, "229ce022dd988d5a"),
    "mbf_large": (606, 6_367_707, "8e858032c8e49ef5"),
    "vit_t": (150, 19_139_330, "e86e47a9c22db2a8"),
    "vit_t_dp005_mask0": (150, 19_139_330, "e86e47a9c22db2a8"),
    "vit_s": (150, 76_025_346, "d41086eb8444b133"),
    "vit_s_dp005_mask_0": (150, 76_025_346, "d41086eb8444b133"),
    "vit_b": (282, 113_835_522, "01a70ce2ff5fcfc5"),
    "vit_b_dp005_mask_005": (282, 113_835_522, "01a70ce2ff5fcfc5"),
    "vit_l_dp005_mask_005": (282, 255_686_914, "c29d9d6604e1ab5b"),
    "vit_h": (546, 756_397_058, "115ba25f7627b22a"),
}

# arcface_torch's backbones/__init__.py: (embed_dim, depth, drop_path_rate, mask_ratio,
# activation checkpointing); all 112 px, patch 9, 8 heads, LayerNorm.
VIT_SPECS = {
    "vit_t": (256, 12, 0.1, 0.1, False),
    "vit_t_dp005_mask0": (256, 12, 0.05, 0.0, False),
    "vit_s": (512, 12, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0, False),
    "vit_b": (512, 24, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05, True),
    "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05, True),
    "vit_h": (1024, 48, 0.1, 0.0, True),
}

TOKENS = 144  # (112 // 9) ** 2: a 12 × 12 grid of 9 × 9 patches (the last 4 pixels unused)


# ---------------------------------------------------------------- expected layouts, by hand


def _bn(prefix, n):
    return [
        (f"{prefix}.weight", (n,)),
        (f"{prefix}.bias", (n,)),
        (f"{prefix}.running_mean", (n,)),
        (f"{prefix}.running_var", (n,)),
        (f"{prefix}.num_batches_tracked", ()),
    ]


def _vit_layout(dim, depth, num_features=512, tokens=TOKENS, patch=9):
    keys = [
        ("pos_embed", (1, tokens, dim)),
        ("mask_token", (1, 1, dim)),
        ("patch_embed.proj.weight", (dim, 3, patch, patch)),
        ("patch_embed.proj.bias", (dim,)),
    ]
    for i in range(depth):
        b = f"blocks.{i}"
        keys += [
            (f"{b}.norm1.weight", (dim,)),
            (f"{b}.norm1.bias", (dim,)),
            (f"{b}.norm2.weight", (dim,)),
            (f"{b}.norm2.bias", (dim,)),
            (f"{b}.attn.qkv.weight", (3 * dim, dim)),
            (f"{b}.attn.proj.weight", (dim, dim)),
            (f"{b}.attn.proj.bias", (dim,)),
            (f"{b}.mlp.fc1.weight", (4 * dim, dim)),
            (f"{b}.mlp.fc1.bias", (4 * dim,)),
            (f"{b}.mlp.fc2.weight", (dim, 4 * dim)),
            (f"{b}.mlp.fc2.bias", (dim,)),
        ]
    keys += [("norm.weight", (dim,)), ("norm.bias", (dim,))]
    keys += [("feature.0.weight", (dim, tokens * dim)), *_bn("feature.1", dim)]
    keys += [("feature.2.weight", (num_features, dim)), *_bn("feature.3", num_features)]
    return keys


def _vit_numel(dim, depth, f=512, t=TOKENS, patch=9):
    """state_dict numel: stem, blocks (2 LN, qkv, proj, fc1, fc2), final LN, head."""
    stem = dim * 3 * patch * patch + dim + t * dim + dim
    block = 4 * dim + 3 * dim * dim + (dim * dim + dim) + (4 * dim * dim + 4 * dim)
    block += 4 * dim * dim + dim
    head = t * dim * dim + (4 * dim + 1) + f * dim + (4 * f + 1)
    return stem + depth * block + 2 * dim + head


def _iresnet_layout(layers, widths=(64, 128, 256, 512), num_features=512):
    keys = [("conv1.weight", (widths[0], 3, 3, 3)), *_bn("bn1", widths[0])]
    keys.append(("prelu.weight", (widths[0],)))
    in_ch = widths[0]
    for stage, (n_blocks, w) in enumerate(zip(layers, widths), start=1):
        for j in range(n_blocks):
            p = f"layer{stage}.{j}"
            keys += [*_bn(f"{p}.bn1", in_ch), (f"{p}.conv1.weight", (w, in_ch, 3, 3))]
            keys += [*_bn(f"{p}.bn2", w), (f"{p}.prelu.weight", (w,))]
            keys += [(f"{p}.conv2.weight", (w, w, 3, 3)), *_bn(f"{p}.bn3", w)]
            if j == 0:  # every stage starts with stride 2: a projection shortcut
                keys += [(f"{p}.downsample.0.weight", (w, in_ch, 1, 1))]
                keys += _bn(f"{p}.downsample.1", w)
            in_ch = w
    keys += [*_bn("bn2", in_ch), ("fc.weight", (num_features, in_ch * 49))]
    keys += [("fc.bias", (num_features,)), *_bn("features", num_features)]
    return keys


def _iresnet_numel(layers, widths=(64, 128, 256, 512), f=512):
    def bn(n):
        return 4 * n + 1

    total = 27 * widths[0] + bn(widths[0]) + widths[0]
    in_ch = widths[0]
    for n_blocks, w in zip(layers, widths):
        first = bn(in_ch) + 9 * w * in_ch + bn(w) + w + 9 * w * w + bn(w) + w * in_ch + bn(w)
        rest = bn(w) + 9 * w * w + bn(w) + w + 9 * w * w + bn(w)
        total += first + (n_blocks - 1) * rest
        in_ch = w
    return total + bn(in_ch) + f * in_ch * 49 + f + bn(f)


def _conv_unit(prefix, cin, cout, k, groups=1, linear=False):
    keys = [(f"{prefix}.layers.0.weight", (cout, cin // groups, k, k))]
    keys += _bn(f"{prefix}.layers.1", cout)
    if not linear:
        keys.append((f"{prefix}.layers.2.weight", (cout,)))
    return keys


def _bottleneck(prefix, cin, cout, hidden):
    return (
        _conv_unit(f"{prefix}.layers.0", cin, hidden, 1)
        + _conv_unit(f"{prefix}.layers.1", hidden, hidden, 3, groups=hidden)
        + _conv_unit(f"{prefix}.layers.2", hidden, cout, 1, linear=True)
    )


def _stage(prefix, c, n_blocks, hidden):
    return [k for j in range(n_blocks) for k in _bottleneck(f"{prefix}.layers.{j}", c, c, hidden)]


def _mbf_layout(blocks, scale, num_features=512):
    c1, c2 = 64 * scale, 128 * scale
    keys = _conv_unit("layers.0", 3, c1, 3)
    if blocks[0] == 1:
        keys += _conv_unit("layers.1", c1, c1, 3, groups=64)
    else:
        keys += _stage("layers.1", c1, blocks[0], 128)
    keys += _bottleneck("layers.2", c1, c1, 128) + _stage("layers.3", c1, blocks[1], 128)
    keys += _bottleneck("layers.4", c1, c2, 256) + _stage("layers.5", c2, blocks[2], 256)
    keys += _bottleneck("layers.6", c2, c2, 512) + _stage("layers.7", c2, blocks[3], 256)
    keys += _conv_unit("conv_sep", c2, 512, 1)
    keys += [("features.layers.0.layers.0.weight", (512, 1, 7, 7))]
    keys += _bn("features.layers.0.layers.1", 512)
    keys += [("features.layers.2.weight", (num_features, 512)), *_bn("features.layers.3", 512)]
    return keys


def _layout_numel(layout):
    return sum(math.prod(shape) for _, shape in layout)


def _fingerprint_of(layout) -> str:
    text = "\n".join(f"{key}:{shape}" for key, shape in layout)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _layout_of(model):
    return [(key, tuple(t.shape)) for key, t in model.state_dict().items()]


def _meta_model(name, **kwargs):
    with torch.device("meta"):
        return get_model(name, **kwargs)


def _tiny_vit(**kwargs):
    args = dict(embed_dim=32, depth=2, num_heads=4, num_features=16)
    args.update(kwargs)
    return VisionTransformer(**args)


def _images(n=2, seed=0, size=112):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen)


def _run_capturing(model, x):
    captured = []
    layer = model.get_submodule(type(model).feature_layer)
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        y = model(x)
    finally:
        handle.remove()
    return captured[0], y


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", sorted(VIT_SPECS))
def test_vit_layout_and_counts_on_meta(name):
    dim, depth, dp_rate, mask_ratio, ckpt = VIT_SPECS[name]
    model = _meta_model(name)
    expected = _vit_layout(dim, depth)
    assert _layout_of(model) == expected
    numel = sum(t.numel() for t in model.state_dict().values())
    assert numel == _vit_numel(dim, depth) == UPSTREAM_FACTS[name][1]
    bn_buffers = (2 * dim + 1) + (2 * 512 + 1)  # running mean, var, count of the head BNs
    assert sum(p.numel() for p in model.parameters()) == numel - bn_buffers
    assert (len(expected), _fingerprint_of(expected)) == (
        UPSTREAM_FACTS[name][0],
        UPSTREAM_FACTS[name][2],
    )
    assert model.num_patches == TOKENS
    assert (model.mask_ratio, model.checkpointing) == (mask_ratio, ckpt)
    rates = [b.drop_path_rate for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(dp_rate)
    assert rates == pytest.approx([dp_rate * i / (depth - 1) for i in range(depth)])


def test_r2060_layout_and_counts_on_meta():
    layers = (3, 128, 896, 3)
    model = _meta_model("r2060")
    expected = _iresnet_layout(layers)
    assert _layout_of(model) == expected
    numel = sum(t.numel() for t in model.state_dict().values())
    assert numel == _iresnet_numel(layers) == UPSTREAM_FACTS["r2060"][1]
    assert (len(expected), _fingerprint_of(expected)) == (
        UPSTREAM_FACTS["r2060"][0],
        UPSTREAM_FACTS["r2060"][2],
    )
    assert model.checkpoint_segments == (0, 20, 100, 0)


@pytest.mark.parametrize(
    "name, blocks, scale", [("mbf", (1, 4, 6, 2), 2), ("mbf_large", (2, 8, 12, 4), 4)]
)
def test_mobilefacenet_layout_and_counts_on_meta(name, blocks, scale):
    expected = _mbf_layout(blocks, scale)
    n_tensors, numel, fingerprint = UPSTREAM_FACTS[name]
    # The hand-written layout is the upstream one (checked on mbf's fact too) ...
    assert (len(expected), _layout_numel(expected), _fingerprint_of(expected)) == (
        n_tensors,
        numel,
        fingerprint,
    )
    # ... and the network's.
    assert _layout_of(_meta_model(name)) == expected


def test_hand_layouts_reproduce_known_iresnet_facts():
    # The IResNet layout writer against test_backbones.py's upstream fact for r50.
    layout = _iresnet_layout((3, 4, 14, 3))
    assert (len(layout), _layout_numel(layout), _fingerprint_of(layout)) == (
        475,
        43_629_071,
        "a7874a3b20e3ccdb",
    )
    assert _iresnet_numel((3, 4, 14, 3)) == 43_629_071


@pytest.mark.parametrize("name", ["mbf_large", "vit_t", "vit_h"])
def test_new_networks_reject_dropout(name):
    with pytest.raises(ValueError, match=rf"'{name}' has no dropout.*0\.2"):
        _meta_model(name, dropout=0.2)


def test_vit_num_features_and_bad_arguments():
    model = _meta_model("vit_s", num_features=128)
    assert model.feature[2].weight.shape == (128, 512)
    with pytest.raises(ValueError, match="num_heads"):
        VisionTransformer(embed_dim=30, num_heads=8, depth=1)
    with pytest.raises(ValueError, match="mask_ratio.*1.0"):
        VisionTransformer(mask_ratio=1.0, depth=1)
    with pytest.raises(ValueError, match="drop_path_rate.*-0.1"):
        VisionTransformer(drop_path_rate=-0.1, depth=1)


# ---------------------------------------------------------------- tokens and masking


def test_vit_tokens_on_meta():
    model = _meta_model("vit_b").eval()
    assert (112 // 9) ** 2 == TOKENS == model.num_patches
    assert type(model).feature_layer == "patch_tokens"
    tokens, emb = _run_capturing(model, torch.empty(3, 3, 112, 112, device="meta"))
    assert tokens.shape == (3, TOKENS, 512)
    assert emb.shape == (3, 512)
    assert model.last_token_mask is None


def test_vit_rejects_other_image_sizes():
    with pytest.raises(ValueError, match=r"112×112.*\(1, 3, 108, 108\)"):
        _tiny_vit().eval()(_images(1, size=108))


@pytest.mark.parametrize("ratio, n_masked", [(0.1, 15), (0.05, 8), (0.5, 72)])
def test_train_mode_masks_a_fixed_count_per_image(ratio, n_masked):
    # kept = int(144 · (1 - ratio)) as arcface_torch: 129.6 → 129 kept, 136.8 → 136 kept.
    assert TOKENS - int(TOKENS * (1 - ratio)) == n_masked
    torch.manual_seed(0)
    model = _tiny_vit(mask_ratio=ratio).train()
    tokens, emb = _run_capturing(model, _images(6))
    kept = model.last_token_mask
    assert kept.dtype == torch.bool and kept.shape == (6, TOKENS)
    assert ((~kept).sum(dim=1) == n_masked).all()
    assert len({tuple(row.tolist()) for row in kept}) > 1  # drawn per image
    # Masked positions of the hooked tokens hold the learned mask token, exactly.
    masked_tokens = tokens[~kept]
    assert masked_tokens.shape == (6 * n_masked, 32)
    torch.testing.assert_close(
        masked_tokens, model.mask_token.reshape(1, 32).expand_as(masked_tokens), rtol=0, atol=0
    )
    assert emb.shape == (6, 16)


def test_masked_patches_are_dropped_before_the_blocks():
    torch.manual_seed(0)
    model = _tiny_vit(mask_ratio=0.3).train()
    x = _images(2, seed=1)
    torch.manual_seed(5)
    tokens, _ = _run_capturing(model, x)
    kept = model.last_token_mask
    # Reference: the kept patches alone through the blocks (attention does not care about
    # their order, and with drop_path 0 the blocks are deterministic in training mode).
    with torch.no_grad():
        all_tokens = model.patch_embed(x) + model.pos_embed
        for i in range(2):
            sub = all_tokens[i][kept[i]].unsqueeze(0)
            for block in model.blocks:
                sub = block(sub)
            torch.testing.assert_close(tokens[i][kept[i]], model.norm(sub)[0])
    # Changing the pixels of a masked patch changes nothing (same draw of the mask).
    r, c = divmod(int(torch.nonzero(~kept[0])[0]), 12)
    x2 = x.clone()
    x2[0, :, 9 * r : 9 * r + 9, 9 * c : 9 * c + 9] += 10.0
    torch.manual_seed(5)
    tokens2, _ = _run_capturing(model, x2)
    assert torch.equal(model.last_token_mask, kept)
    torch.testing.assert_close(tokens2, tokens, rtol=0, atol=0)


def test_eval_mode_never_masks_and_is_deterministic():
    torch.manual_seed(0)
    model = _tiny_vit(mask_ratio=0.5, drop_path_rate=0.5).train()
    model(_images())
    assert model.last_token_mask is not None
    model.eval()
    x = _images(3, seed=2)
    with torch.no_grad():
        a, b = model(x), model(x)
        single = model(x[1:2])
    assert model.last_token_mask is None
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(single[0], a[1], rtol=1e-5, atol=1e-5)


def test_no_mask_recorded_when_mask_ratio_is_zero():
    model = _tiny_vit(mask_ratio=0.0).train()
    model(_images())
    assert model.last_token_mask is None


# ---------------------------------------------------------------- drop path, checkpointing


def test_drop_path_statistics():
    x = torch.ones(20_000, 3, 2)
    torch.manual_seed(0)
    y = drop_path(x, 0.25, training=True)
    per_sample = y[:, 0, 0]
    # Whole samples are dropped or kept; survivors scaled by 1 / 0.75.
    assert (y == per_sample[:, None, None]).all()
    assert per_sample.unique().tolist() == [0.0, pytest.approx(4 / 3)]
    dropped = (per_sample == 0).float().mean().item()
    assert abs(dropped - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 20_000)
    assert drop_path(x, 0.25, training=False) is x
    assert drop_path(x, 0.0, training=True) is x


def test_drop_path_acts_in_training_only():
    torch.manual_seed(0)
    model = _tiny_vit(drop_path_rate=0.5)
    x = _images(4)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def _grads_after_step(model, x, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    model(x).square().sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_vit_checkpointing_gives_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    plain = _tiny_vit(depth=3, drop_path_rate=0.3, mask_ratio=0.2).train()
    ckpt = _tiny_vit(depth=3, drop_path_rate=0.3, mask_ratio=0.2, checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(vit_mod, "checkpoint", counting_checkpoint)
    x = _images(4, seed=3)
    ref = _grads_after_step(plain, x, seed=7)
    got = _grads_after_step(ckpt, x, seed=7)
    assert calls == [False] * 3  # every block, non-reentrant
    assert set(got) == set(ref) and "mask_token" in ref and "blocks.2.attn.qkv.weight" in ref
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    ckpt.eval()
    with torch.no_grad():
        ckpt(x)
    assert len(calls) == 3  # not in eval mode


def test_iresnet_checkpoint_segments_give_the_same_gradients():
    args = dict(widths=(8, 8, 16, 16), stem_stride=2, stage_strides=(2, 2, 2, 1))
    torch.manual_seed(0)
    plain = IResNet((1, 3, 4, 1), **args).train()
    ckpt = IResNet((1, 3, 4, 1), checkpoint_segments=(0, 2, 4, 0), **args).train()
    ckpt.load_state_dict(plain.state_dict())
    x = _images(3, seed=4)
    ref = _grads_after_step(plain, x, seed=1)
    got = _grads_after_step(ckpt, x, seed=1)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match=r"checkpoint_segments.*\(0, 4, 0, 0\)"):
        IResNet((1, 3, 4, 1), checkpoint_segments=(0, 4, 0, 0), **args)


def test_vit_fp16_flag_does_not_autocast_on_cpu():
    torch.manual_seed(0)
    plain = _tiny_vit().eval()
    half = _tiny_vit(fp16=True).eval()
    half.load_state_dict(plain.state_dict())
    x = _images()
    with torch.no_grad():
        y_plain, y_half = plain(x), half(x)
    assert y_half.dtype == torch.float32
    torch.testing.assert_close(y_half, y_plain, rtol=0, atol=0)


def test_vit_strict_round_trip():
    torch.manual_seed(1)
    src = _tiny_vit(mask_ratio=0.1, drop_path_rate=0.1).train()
    with torch.no_grad():
        src(_images(4, seed=3))  # move the head's BN statistics
    torch.manual_seed(2)
    dst = _tiny_vit()
    result = dst.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = _images(seed=4)
    src.eval()
    dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


# ---------------------------------------------------------------- ONNX


def test_tiny_vit_onnx_export_and_parity(tmp_path):
    torch.manual_seed(0)
    model = _tiny_vit(mask_ratio=0.1, drop_path_rate=0.1, checkpointing=True)
    with torch.no_grad():  # a head with non-trivial statistics
        model.train()(_images(8))
        for bn in (model.feature[1], model.feature[3]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    path = export_onnx(model, tmp_path / "vit.onnx")
    graph = onnx.load(str(path)).graph
    (inp,) = graph.input
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 112, 112]
    cosine, abs_diff = check_onnx_parity(model, path, batch_sizes=(1, 5))
    assert cosine >= 0.9999 and abs_diff < 1e-3
    assert not model.training


# ---------------------------------------------------------------- against arcface_torch


def _checkout():
    path = os.environ.get("ARCFACE_TORCH") or str(ROOT / ".upstream/recognition/arcface_torch")
    root = Path(path)
    if not (root / "backbones").is_dir() and (root / "recognition/arcface_torch").is_dir():
        root = root / "recognition/arcface_torch"
    return root if (root / "backbones" / "vit.py").is_file() else None


CHECKOUT = _checkout()
needs_upstream = pytest.mark.skipif(
    CHECKOUT is None, reason="no arcface_torch checkout (set ARCFACE_TORCH)"
)


def _timm_stub():
    # arcface_torch's vit.py imports three helpers from timm. Only eval-mode outputs and
    # drop-path-free training are compared, so DropPath may be the identity.
    layers = types.ModuleType("timm.models.layers")

    class DropPath(nn.Module):
        def __init__(self, rate):
            super().__init__()
            self.rate = rate

        def forward(self, x):
            return x

    layers.DropPath = DropPath
    layers.to_2tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    layers.trunc_normal_ = nn.init.trunc_normal_
    return {
        "timm": types.ModuleType("timm"),
        "timm.models": types.ModuleType("timm.models"),
        "timm.models.layers": layers,
    }


@pytest.fixture(scope="module")
def upstream():
    """arcface_torch's backbone modules by file stem, imported under private names."""
    modules = {}
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("timm") is None:
            for name, module in _timm_stub().items():
                mp.setitem(sys.modules, name, module)
        for stem in ("vit", "iresnet2060", "mobilefacenet"):
            path = CHECKOUT / "backbones" / f"{stem}.py"
            modules[stem] = load_file(path, f"_arcface_torch_{stem}")
    return modules


def _same_embeddings(ours, theirs, x, *, train=False):
    ours.train(train)
    theirs.train(train)
    with torch.no_grad():
        torch.manual_seed(11)
        y_ours = ours(x)
        torch.manual_seed(11)
        y_theirs = theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-4, atol=1e-5)


def _round_trip(ours, theirs):
    assert _layout_of(ours) == _layout_of(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


@needs_upstream
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:CUDA is not available:UserWarning")
@pytest.mark.parametrize(
    "dim, depth, mask_ratio", [(256, 12, 0.1), (32, 2, 0.1), (32, 3, 0.0)], ids=str
)
def test_vit_matches_upstream(upstream, dim, depth, mask_ratio):
    torch.manual_seed(0)
    theirs = upstream["vit"].VisionTransformer(
        img_size=112,
        patch_size=9,
        num_classes=64,
        embed_dim=dim,
        depth=depth,
        num_heads=8,
        drop_path_rate=0.1,
        norm_layer="ln",
        mask_ratio=mask_ratio,
    )
    ours = VisionTransformer(
        num_features=64, embed_dim=dim, depth=depth, drop_path_rate=0.1, mask_ratio=mask_ratio
    )
    with torch.no_grad():  # move the head's BN statistics off their initial values
        theirs.train()(_images(4, seed=8))
    _round_trip(ours, theirs)
    x = _images(3, seed=9)
    _same_embeddings(ours, theirs, x)
    # Training mode with drop path off: the same seed draws the same mask in both, and the
    # mask token lands in the same places (arcface_torch masks at 0.1 whatever is set).
    for block in ours.blocks:
        block.drop_path_rate = 0.0
    _same_embeddings(ours, theirs, x, train=True)


@needs_upstream
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:CUDA is not available:UserWarning")
def test_mbf_large_matches_upstream(upstream):
    torch.manual_seed(0)
    theirs = upstream["mobilefacenet"].get_mbf_large(fp16=False, num_features=512)
    ours = get_model("mbf_large")
    with torch.no_grad():
        theirs.train()(_images(2, seed=8))
    _round_trip(ours, theirs)
    _same_embeddings(ours, theirs, _images(2, seed=9))


@needs_upstream
def test_r2060_matches_upstream_keys_on_meta(upstream):
    with torch.device("meta"):
        theirs = upstream["iresnet2060"].iresnet2060(False, dropout=0.0, num_features=512)
    ours = _meta_model("r2060")
    assert _layout_of(ours) == _layout_of(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
