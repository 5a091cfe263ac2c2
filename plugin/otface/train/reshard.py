"""Partial FC's class centres and their optimiser state, moved from one world size to another.

A training checkpoint ``checkpoint_gpu_{r}.pt`` of a run on ``N`` ranks holds, besides the
backbone (the same on every rank), rank ``r``'s shard of the class centres
(``state_dict_softmax_fc["weight"]``, rows ``shard_range(C, rank=r, world_size=N)``) and, in the
optimiser's last parameter group, that shard's optimiser state (SGD's ``momentum_buffer``,
AdamW's ``exp_avg`` / ``exp_avg_sq``: one row per class). Resharding gathers the rows a new
rank holds under ``M`` ranks from the old shards that overlap them, in class order, exactly
(slices and concatenations, no arithmetic). Per-class tensors are recognised by their first
dimension (the shard's class count); anything else in that state (AdamW's ``step``) is the same
on every rank and comes from the base checkpoint.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, NamedTuple

import torch

from otface.partial_fc import shard_range
from otface.train.checkpoint import CheckpointError

__all__ = ["FC_KEY", "FcShard", "fc_param_id", "gather_fc_rows", "with_fc_shard"]

FC_KEY = "state_dict_softmax_fc"


class FcShard(NamedTuple):
    """The class centres ``(num_local, D)`` a rank holds and their per-class optimiser state
    (name → ``(num_local, ...)`` tensor), in class order."""

    weight: torch.Tensor
    optimizer_rows: dict[str, torch.Tensor]


def fc_param_id(state: dict[str, Any], where: str) -> int:
    """Index of the class centres in ``state["state_optimizer"]``: the one parameter of the
    last of two parameter groups (backbone, Partial FC), as the trainer builds it."""
    groups = state["state_optimizer"].get("param_groups", [])
    if len(groups) != 2 or len(groups[-1]["params"]) != 1:
        raise CheckpointError(
            f"{where}: key 'state_optimizer' has {len(groups)} parameter groups, expected 2 "
            "(backbone, then Partial FC's class centres); it was not written by this trainer"
        )
    return groups[-1]["params"][0]


def _fc_weight(state: dict[str, Any], where: str, num_local: int) -> torch.Tensor:
    weight = state[FC_KEY].get("weight") if isinstance(state[FC_KEY], dict) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != num_local:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise CheckpointError(
            f"{where}: key '{FC_KEY}.weight' is {shape}, expected {num_local} class centres "
            "for its rank; num_classes or the number of checkpoint files does not match the run "
            "that wrote it"
        )
    return weight


def _row_state(state: dict[str, Any], where: str, num_local: int) -> dict[str, torch.Tensor]:
    entry = state["state_optimizer"]["state"].get(fc_param_id(state, where), {})
    return {
        k: v
        for k, v in entry.items()
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == num_local
    }


def gather_fc_rows(
    load_shard: Callable[[int], tuple[dict[str, Any], str]],
    *,
    source_world_size: int,
    num_classes: int,
    rank: int,
    world_size: int,
) -> FcShard:
    """Rank ``rank``'s shard under ``world_size`` ranks, cut from ``source_world_size`` shards.

    Args:
        load_shard: ``load_shard(s) -> (state, file name)`` of old rank ``s``; called only for
            the old shards that overlap the new one, in order.
        source_world_size: ranks that wrote the shards (``N``).
        num_classes: classes in all (``C``); both splits are :func:`shard_range`'s.
        rank, world_size: the new rank and number of ranks (``M``).

    Raises:
        CheckpointError: a shard's centres or optimiser state do not have the rows its rank
            should hold (the message names the file and key).
    """
    start, count = shard_range(num_classes, rank=rank, world_size=world_size)
    weights: list[torch.Tensor] = []
    rows: dict[str, list[torch.Tensor]] = {}
    names: set[str] | None = None
    for s in range(source_world_size):
        s_start, s_count = shard_range(num_classes, rank=s, world_size=source_world_size)
        lo, hi = max(start, s_start), min(start + count, s_start + s_count)
        if lo >= hi:
            continue
        state, where = load_shard(s)
        cut = slice(lo - s_start, hi - s_start)
        weights.append(_fc_weight(state, where, s_count)[cut])
        shard_rows = _row_state(state, where, s_count)
        if names is not None and set(shard_rows) != names:
            raise CheckpointError(
                f"{where}: key 'state_optimizer' holds per-class state {sorted(shard_rows)} for "
                f"the class centres, other ranks' files hold {sorted(names)}"
            )
        names = set(shard_rows)
        for k, v in shard_rows.items():
            rows.setdefault(k, []).append(v[cut])
    return FcShard(torch.cat(weights).clone(), {k: torch.cat(v).clone() for k, v in rows.items()})


def with_fc_shard(base: dict[str, Any], shard: FcShard, where: str) -> dict[str, Any]:
    """A copy of checkpoint ``base`` holding ``shard`` as its class centres and their
    optimiser state; every other entry (and the order of keys) is ``base``'s."""
    # Shallow copies keep each container's type (a state_dict's OrderedDict and its _metadata).
    out = copy.copy(base)
    out[FC_KEY] = copy.copy(base[FC_KEY])
    out[FC_KEY]["weight"] = shard.weight
    optimizer = copy.copy(base["state_optimizer"])
    states = copy.copy(optimizer["state"])
    fc_id = fc_param_id(base, where)
    if fc_id in states or shard.optimizer_rows:
        entry = states.get(fc_id, {})
        merged = {k: shard.optimizer_rows.get(k, v) for k, v in entry.items()}
        merged.update({k: v for k, v in shard.optimizer_rows.items() if k not in merged})
        states[fc_id] = merged
    optimizer["state"] = states
    out["state_optimizer"] = optimizer
    return out
