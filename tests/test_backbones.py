"""Backbones: arcface_torch-compatible state_dict layout, shapes, forward semantics."""

from __future__ import annotations

import hashlib

import pytest
import torch

from otface.backbones import get_model, list_models

# Measured on arcface_torch's get_model(name, dropout=0.0, fp16=False, num_features=512):
# (tensors in state_dict, total numel incl. buffers, sha256[:16] of "key:shape" lines).
UPSTREAM_FACTS = {
    "r18": (187, 24_040_351, "dc8bc15b11464dbd"),
    "r34": (331, 34_165_239, "ffb8c3eca78a61f9"),
    "r50": (475, 43_629_071, "a7874a3b20e3ccdb"),
    "r100": (925, 65_225_946, "c131b1e80ba72607"),
    "r200": (1807, 118_970_285, "9cb3b80f2ed9084c"),
    "mbf": (333, 2_083_378, "229ce022dd988d5a"),
}


def _meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return get_model(name, **kwargs)


def _fingerprint(state_dict) -> str:
    lines = [f"{key}:{tuple(t.shape)}" for key, t in state_dict.items()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 112, 112, generator=gen)


def _capture(model: torch.nn.Module, layer: str, x: torch.Tensor):
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: captured.append(out)
    )
    try:
        y = model(x)
    finally:
        handle.remove()
    return captured[0], y


@pytest.mark.parametrize("name", sorted(UPSTREAM_FACTS))
def test_state_dict_matches_upstream_facts(name):
    sd = _meta_model(name).state_dict()
    n_tensors, numel, fingerprint = UPSTREAM_FACTS[name]
    assert len(sd) == n_tensors
    assert sum(t.numel() for t in sd.values()) == numel
    assert _fingerprint(sd) == fingerprint


def test_fingerprint_format_on_a_hand_written_case():
    # The format the facts were measured with: scalar buffers print as "()".
    sd = {"conv1.weight": torch.empty(64, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(0)}
    text = "conv1.weight:(64, 3, 3, 3)\nbn.num_batches_tracked:()"
    assert _fingerprint(sd) == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_list_models():
    assert list_models() == [
        *("r18", "r34", "r50", "r100", "r200", "r2060", "mbf", "mbf_large"),
        *("vit_t", "vit_t_dp005_mask0", "vit_s", "vit_s_dp005_mask_0", "vit_b"),
        *("vit_b_dp005_mask_005", "vit_l_dp005_mask_005", "vit_h", "r18_lite", "vit_t_lite"),
    ]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_model("r101")
    msg = str(err.value)
    assert "'r101'" in msg
    for name in ("r18", "r34", "r50", "r100", "r200", "mbf", "r18_lite"):
        assert name in msg


def test_mbf_rejects_dropout():
    with pytest.raises(ValueError, match="dropout"):
        get_model("mbf", dropout=0.1)


@pytest.mark.parametrize("name", ["r18", "r100"])
def test_iresnet_bn2_feature_map_on_meta(name):
    model = _meta_model(name).eval()
    assert type(model).feature_layer == "bn2"
    feat, emb = _capture(model, "bn2", torch.empty(3, 3, 112, 112, device="meta"))
    assert feat.shape == (3, 512, 7, 7)
    assert emb.shape == (3, 512)


def test_mbf_feature_layer_is_last_1x1_conv_block_on_meta():
    model = _meta_model("mbf").eval()
    layer = model.get_submodule(type(model).feature_layer)
    conv = layer.layers[0]
    assert conv.kernel_size == (1, 1) and conv.out_channels == 512
    feat, emb = _capture(
        model, type(model).feature_layer, torch.empty(3, 3, 112, 112, device="meta")
    )
    assert feat.shape == (3, 512, 7, 7)
    assert emb.shape == (3, 512)


@pytest.mark.parametrize("name", ["r18_lite", "mbf"])
def test_real_cpu_forward_shape(name):
    torch.manual_seed(0)
    model = get_model(name)
    for mode in (model.train, model.eval):
        mode()
        with torch.no_grad():
            y = model(_images())
        assert y.shape == (2, 512) and y.dtype == torch.float32
        assert torch.isfinite(y).all()


def test_r18_lite_bn2_and_embedding_head():
    torch.manual_seed(0)
    model = get_model("r18_lite", num_features=128).eval()
    with torch.no_grad():
        feat, emb = _capture(model, "bn2", _images())
        assert feat.shape == (2, 128, 7, 7)
        assert emb.shape == (2, 128)
        # The embedding is the last BatchNorm1d applied to fc(flatten(bn2 map)).
        bn = model.features
        z = model.fc(feat.flatten(1))
        ref = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(emb, ref)


def test_iresnet_embedding_bn_scale_is_frozen():
    model = _meta_model("r50")
    assert not model.features.weight.requires_grad
    assert model.features.bias.requires_grad


@pytest.mark.parametrize("name", ["r18_lite", "mbf"])
def test_state_dict_round_trip_strict(name):
    torch.manual_seed(1)
    src = get_model(name)
    src.train()
    with torch.no_grad():
        src(_images(4, seed=3))  # move BN running stats off their initial values
    torch.manual_seed(2)
    dst = get_model(name)
    x = _images(seed=4)
    src.eval()
    dst.eval()
    with torch.no_grad():
        assert not torch.equal(src(x), dst(x))
        result = dst.load_state_dict(src.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_strict_load_rejects_other_depth():
    with pytest.raises(RuntimeError, match="Unexpected key"):
        _meta_model("r18").load_state_dict(_meta_model("r34").state_dict(), strict=True)


@pytest.mark.parametrize("name", ["r18_lite", "mbf"])
def test_eval_forward_is_deterministic_and_per_sample(name):
    torch.manual_seed(0)
    model = get_model(name, dropout=0.0).eval()
    x = _images(3, seed=5)
    with torch.no_grad():
        a, b = model(x), model(x)
        single = model(x[1:2])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # In eval mode a sample's embedding does not depend on the rest of the batch.
    torch.testing.assert_close(single[0], a[1], rtol=1e-4, atol=1e-4)


def test_fp16_flag_does_not_autocast_on_cpu():
    torch.manual_seed(0)
    plain = get_model("r18_lite").eval()
    half = get_model("r18_lite", fp16=True).eval()
    half.load_state_dict(plain.state_dict())
    x = _images()
    with torch.no_grad():
        y_plain, y_half = plain(x), half(x)
    assert y_half.dtype == torch.float32
    torch.testing.assert_close(y_half, y_plain, rtol=0, atol=0)


def test_dropout_is_identity_in_eval_and_active_in_train():
    torch.manual_seed(0)
    model = get_model("r18_lite", dropout=0.5)
    plain = get_model("r18_lite", dropout=0.0)
    plain.load_state_dict(model.state_dict())
    x = _images()
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert model.dropout.p == 0.5
    # Train mode: the FC sees about half its inputs zeroed, so the embeddings differ.
    model.train()
    plain.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), plain(x))


def test_bad_dropout_is_rejected():
    with pytest.raises(ValueError, match="dropout"):
        get_model("r18", dropout=1.5)
