"""otface.backbones.guess: guess_network against a plain search over every registered network.

The reference builds every network and scores each against the state_dict, as guess_network did
before it learnt to skip networks by their key count; the two must agree on every network's own
state_dict and on damaged ones.
"""

from __future__ import annotations

import pytest
import torch

import otface.backbones as backbones
from otface.backbones import get_model, list_models
from otface.backbones.guess import _KEY_COUNTS, _network_shapes, guess_network


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def layouts():
    """Key → shape of every registered network at embedding size 512 (built on meta)."""
    out = {}
    for name in list_models():
        with torch.device("meta"):
            out[name] = _shapes(get_model(name).state_dict())
    return out


def _reference(found, layouts):
    """Every network scored, in registration order (all layouts are at embedding size 512)."""
    best, best_score = None, 0.0
    for name, expected in layouts.items():
        if expected == found:
            return name
        same = sum(1 for k, s in expected.items() if found.get(k) == s)
        score = same / max(len(expected), len(found))
        if score > best_score:
            best, best_score = name, score
    return f"nearest: {best}" if best is not None and best_score >= 0.5 else None


def _meta_state(layout):
    return {k: torch.empty(s, device="meta") for k, s in layout.items()}


def test_key_count_table_matches_every_network(layouts):
    assert _KEY_COUNTS == {name: len(layout) for name, layout in layouts.items()}


def test_every_network_is_named_as_the_plain_search_names_it(layouts):
    for name, layout in layouts.items():
        guess = guess_network(_meta_state(layout))
        assert guess == _reference(layout, layouts), name
        # Variants that differ only in drop-path or masking share a layout: the first is named.
        assert layouts[guess] == layout
        assert list_models().index(guess) <= list_models().index(name)
    assert guess_network(_meta_state(layouts["vit_t_dp005_mask0"])) == "vit_t"


def test_damaged_and_foreign_state_dicts(layouts):
    r50 = layouts["r50"]
    no_bias = {k: s for k, s in r50.items() if k != "fc.bias"}
    wide_stem = {**r50, "conv1.weight": (32, 3, 3, 3)}
    mbf = list(layouts["mbf"].items())
    # Just over and just under half of mbf's entries: a near match, then none.
    over, under = dict(mbf[: len(mbf) // 2 + 1]), dict(mbf[: len(mbf) // 2 - 1])
    cases = {
        "no_bias": (no_bias, "nearest: r50"),
        "wide_stem": (wide_stem, "nearest: r50"),
        "extra_key": ({**layouts["vit_t_lite"], "head.weight": (2, 2)}, "nearest: vit_t_lite"),
        "over_half_mbf": (over, "nearest: mbf"),
        "under_half_mbf": (under, None),
        "junk": ({"x": (3,)}, None),
        "empty": ({}, None),
    }
    for label, (found, expected) in cases.items():
        assert _reference(found, layouts) == expected, label
        assert guess_network(_meta_state(found)) == expected, label


def test_embedding_size_from_features_weight():
    for name, size in (("r50", 128), ("r18_lite", 32)):
        with torch.device("meta"):
            state = get_model(name, num_features=size).state_dict()
        assert guess_network(state) == name


def test_only_networks_with_as_many_keys_are_built(layouts, monkeypatch):
    built = []

    def counting_get_model(name, **kwargs):
        built.append(name)
        return get_model(name, **kwargs)

    monkeypatch.setattr(backbones, "get_model", counting_get_model)
    _network_shapes.cache_clear()
    assert guess_network(_meta_state(layouts["r18_lite"])) == "r18_lite"
    assert built == ["r18_lite"]
    built.clear()
    # Four ViTs have 150 entries: they are built in registration order until one fits.
    assert guess_network(_meta_state(layouts["vit_s"])) == "vit_s"
    assert built == ["vit_t", "vit_t_dp005_mask0", "vit_s"]
    _network_shapes.cache_clear()
