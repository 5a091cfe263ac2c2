"""Which registered backbone a ``state_dict`` was written by, from its key names and shapes.

Building a network, even on the meta device, costs up to seconds (r2060 has over a thousand
blocks), so a network is built only when its number of ``state_dict`` entries lets it be the
answer: equal for an exact match, within a factor of two for a near one. Built key shapes are
kept for the next call.
"""

from __future__ import annotations

import functools
from typing import Dict, Mapping, Optional, Tuple

import torch

__all__ = ["guess_network", "network_hint"]

Shapes = Dict[str, Tuple[int, ...]]

# len(get_model(name).state_dict()) of each registered network; it does not depend on
# num_features. A name missing here is built to count its entries; the test of this module
# checks the table against every registered network.
_KEY_COUNTS = {
    "r18": 187,
    "r34": 331,
    "r50": 475,
    "r100": 925,
    "r200": 1807,
    "r2060": 18583,
    "mbf": 333,
    "mbf_large": 606,
    "vit_t": 150,
    "vit_t_dp005_mask0": 150,
    "vit_s": 150,
    "vit_s_dp005_mask_0": 150,
    "vit_b": 282,
    "vit_b_dp005_mask_005": 282,
    "vit_l_dp005_mask_005": 282,
    "vit_h": 546,
    "r18_lite": 115,
    "vit_t_lite": 40,
}

# A near match shares at least this fraction of the larger of the two key sets.
_NEAR = 0.5


@functools.lru_cache(maxsize=64)
def _network_shapes(name: str, num_features: int) -> Optional[Shapes]:
    """Key → shape of network ``name`` at this embedding size (built on the meta device), or
    None when it cannot be built at this size. Callers must not modify the result."""
    from otface.backbones import get_model

    try:
        with torch.device("meta"):
            net = get_model(name, dropout=0.0, fp16=False, num_features=num_features)
    except Exception:  # a network that cannot be built at this size is not the one
        return None
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _key_count(name: str) -> Optional[int]:
    if name in _KEY_COUNTS:
        return _KEY_COUNTS[name]
    shapes = _network_shapes(name, 512)
    return None if shapes is None else len(shapes)


def guess_network(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The name of this project's backbone whose state_dict has exactly the keys and shapes of
    ``state``, else the closest one as ``"nearest: NAME"``, else None.

    The embedding size is read from ``features.weight`` (512 without it). Of several networks
    with equal layouts the first registered is named. Closest: the largest share of equal
    ``key: shape`` entries over the larger of the two key sets, at least one half; ties go to
    the first registered.
    """
    from otface.backbones import list_models

    found = {k: tuple(v.shape) for k, v in state.items()}
    features = found.get("features.weight")
    num_features = features[0] if features else 512
    counts = {name: _key_count(name) for name in list_models()}
    for name, n_keys in counts.items():
        if n_keys == len(found) and _network_shapes(name, num_features) == found:
            return name
    best, best_score = None, 0.0
    for name, n_keys in counts.items():
        if n_keys is None:
            continue
        # At most min(n_keys, len(found)) entries can be equal: skip a network that could
        # neither reach a near match nor beat the best so far.
        bound = min(n_keys, len(found)) / max(n_keys, len(found))
        if bound < _NEAR or bound <= best_score:
            continue
        expected = _network_shapes(name, num_features)
        if expected is None:
            continue
        same = sum(1 for k, s in expected.items() if found.get(k) == s)
        score = same / max(len(expected), len(found))
        if score > best_score:
            best, best_score = name, score
    return f"nearest: {best}" if best is not None and best_score >= _NEAR else None


def network_hint(state: Mapping[str, torch.Tensor]) -> str:
    """What :func:`guess_network` makes of ``state``, as a phrase for an error message:
    ``"it looks like network 'r50' with embedding_size 512"``, ``"it is closest to network
    'r50', but not equal"`` or ``"it matches none of this project's networks"``."""
    looks = guess_network(state)
    if looks is None:
        return "it matches none of this project's networks"
    if looks.startswith("nearest: "):
        return f"it is closest to network {looks[len('nearest: ') :]!r}, but not equal"
    features = state.get("features.weight")
    size = f" with embedding_size {tuple(features.shape)[0]}" if features is not None else ""
    return f"it looks like network {looks!r}{size}"
