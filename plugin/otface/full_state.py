"""One full-state file from a run's per-rank checkpoints, and back.

    python -m otface.full_state merge work_dirs/NAME [--output FILE]
    python -m otface.full_state split FILE --world-size M --output DIR

``merge`` reads the ``N`` files ``checkpoint_gpu_{r}.pt`` of the newest step that every rank has
(verified by their checksums) and writes ``work_dirs/NAME/full_state.pt``: rank 0's checkpoint
with all class centres, in class order, as ``state_dict_softmax_fc["weight"]`` ``(C, D)`` and
their optimiser state likewise, so it is also a one-rank training checkpoint. The key
``full_state`` adds what differs between ranks (BatchNorm statistics, RNG states), so that
``split`` with ``M = N`` gives back every rank's file bit for bit. ``split`` writes
``checkpoint_gpu_{r}.pt`` for ``M`` ranks into an empty folder (ranks beyond ``N`` start from
rank 0's state); a run resumed there continues at the same step (:mod:`otface.train.elastic`).
Every file is written atomically with a ``.sha256`` sidecar, as the training checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any, Iterator

import numpy as np
import torch

from otface.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_latest_checkpoint,
    load_verified,
    save_checkpoint,
    save_verified,
)
from otface.train.elastic import find_saved_runs
from otface.train.identity import folder_run_id
from otface.train.reshard import FC_KEY, fc_param_id, gather_fc_rows, with_fc_shard

__all__ = ["FULL_STATE_NAME", "main", "merge", "split"]

FULL_STATE_NAME = "full_state.pt"
_META = "full_state"
_FORMAT_VERSION = 1


def _leaves(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, path + (key,))
    else:
        yield path, obj


def _same(a: Any, b: Any) -> bool:
    """Equal in type, dtype, shape and every bit of value (NaNs count as different)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _sharded_paths(state: dict[str, Any], where: str) -> tuple[tuple, ...]:
    return ((FC_KEY,), ("state_optimizer", "state", fc_param_id(state, where)))


def _differences(state: dict, reference: dict, skip: tuple[tuple, ...]) -> dict[str, list]:
    """What turns ``reference`` into ``state``, outside the ``skip`` subtrees."""

    def kept(path: tuple) -> bool:
        return not any(path[: len(s)] == s for s in skip)

    ref = {p: v for p, v in _leaves(reference) if kept(p)}
    own = {p: v for p, v in _leaves(state) if kept(p)}
    changed = [(p, v) for p, v in own.items() if p not in ref or not _same(v, ref[p])]
    return {"set": changed, "drop": [p for p in ref if p not in own]}


def _apply(reference: dict, differences: dict[str, list]) -> dict:
    """``reference`` with ``differences`` applied; containers on a changed path are copied."""
    out = copy.copy(reference)

    def parent(path: tuple) -> dict:
        node = out
        for key in path[:-1]:
            node[key] = copy.copy(node[key]) if key in node else {}
            node = node[key]
        return node

    for path, value in differences["set"]:
        parent(path)[path[-1]] = value
    for path in differences["drop"]:
        parent(path).pop(path[-1], None)
    return out


def _load_run(output: str) -> tuple[list[dict[str, Any]], list[str]]:
    problems = []
    run_id = folder_run_id(output)  # every file of one run, never a stray one of another
    for step, world_size in find_saved_runs(output, run_id=run_id):
        try:
            loaded = [
                load_latest_checkpoint(output, r, global_step=step, run_id=run_id)
                for r in range(world_size)
            ]
        except CheckpointError as err:
            problems.append(str(err))
            continue
        return [s for s, _ in loaded], [p for _, p in loaded]
    why = "; ".join(problems) if problems else f"{checkpoint_path(output, 0)} cannot be read"
    raise CheckpointError(f"no complete set of checkpoints in {output}: {why}")


def merge(output: str, dest: str | None = None) -> str:
    """Write the full-state file of the run in ``output``; returns its path.

    Raises:
        CheckpointError: the per-rank files are missing, corrupt or do not fit together.
    """
    states, paths = _load_run(output)
    num_classes = sum(int(s[FC_KEY]["weight"].shape[0]) for s in states)
    shard = gather_fc_rows(
        lambda s: (states[s], paths[s]),
        source_world_size=len(states),
        num_classes=num_classes,
        rank=0,
        world_size=1,
    )
    full = with_fc_shard(states[0], shard, paths[0])
    if "world_size" in full:
        full["world_size"] = 1
    skip = _sharded_paths(states[0], paths[0])
    full[_META] = {
        "version": _FORMAT_VERSION,
        "source_world_size": len(states),
        "num_classes": num_classes,
        "per_rank": [_differences(s, states[0], skip) for s in states],
        "files": [os.path.basename(p) for p in paths],
    }
    dest = dest or os.path.join(output, FULL_STATE_NAME)
    save_verified(full, dest)
    return dest


def split(path: str, world_size: int, dest: str) -> list[str]:
    """Write ``checkpoint_gpu_{r}.pt`` for ``world_size`` ranks from a full-state file.

    Raises:
        CheckpointError: ``path`` is not a full-state file, is corrupt, or ``dest`` already
            holds checkpoints.
    """
    if world_size < 1:
        raise CheckpointError(f"--world-size must be >= 1, got {world_size}")
    full = load_verified(path)
    meta = full.get(_META) if isinstance(full, dict) else None
    if not isinstance(meta, dict) or meta.get("version") != _FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: no key '{_META}' of version {_FORMAT_VERSION}; "
            "it was not written by 'python -m otface.full_state merge'"
        )
    if os.path.exists(checkpoint_path(dest, 0)):
        raise CheckpointError(
            f"{dest} already holds {os.path.basename(checkpoint_path(dest, 0))}; "
            "split into an empty folder"
        )
    num_classes = int(meta["num_classes"])
    if world_size > num_classes:
        raise CheckpointError(
            f"--world-size {world_size} is more than the {num_classes} class centres in {path}"
        )
    common = copy.copy(full)
    del common[_META]
    written = []
    for rank in range(world_size):
        per_rank = meta["per_rank"]
        base = _apply(common, per_rank[rank]) if rank < len(per_rank) else copy.copy(common)
        shard = gather_fc_rows(
            lambda s: (common, path),
            source_world_size=1,
            num_classes=num_classes,
            rank=rank,
            world_size=world_size,
        )
        state = with_fc_shard(base, shard, path)
        if "world_size" in state:
            state["world_size"] = world_size
        written.append(save_checkpoint(state, dest, rank))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m otface.full_state",
        description="Merge a run's per-rank checkpoints into one full-state file, or split one "
        "for another number of ranks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_merge = sub.add_parser("merge", help="work_dirs/NAME -> work_dirs/NAME/full_state.pt")
    p_merge.add_argument("output", help="the run's output folder (work_dirs/NAME)")
    p_merge.add_argument("--output", dest="dest", help=f"file to write (default {FULL_STATE_NAME})")
    p_split = sub.add_parser("split", help="full_state.pt -> checkpoint_gpu_{r}.pt for M ranks")
    p_split.add_argument("file", help="a full-state file written by merge")
    p_split.add_argument("--world-size", type=int, required=True, help="number of ranks M")
    p_split.add_argument("--output", dest="dest", required=True, help="an empty folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            print(merge(args.output, args.dest))
        else:
            print("\n".join(split(args.file, args.world_size, args.dest)))
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
