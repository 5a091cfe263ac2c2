"""Run identity: each fresh start draws an id, and everything the run writes carries it.

The id is stored in every ``checkpoint_gpu_{rank}.pt`` (key ``run_id``), in the checkpoint's
checksum sidecar (so it can be read without opening the checkpoint, and survives a truncated
one), in ``training.log``'s ``==== run started`` header and in ``model.pt``'s state-dict
metadata. A resume continues the run named by the folder's ``training.log`` (else by rank 0's
newest checkpoint) and takes only checkpoints carrying that id: another run's file is never a
fallback.

Checkpoints written before run ids existed carry none; they resume as before, with one warning.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from typing import Any

import torch

from otface.train.checkpoint import checkpoint_path, previous_checkpoint_path, read_header
from otface.train.integrity import sidecar_run_id

__all__ = [
    "LOG_NAME",
    "MODEL_METADATA_KEY",
    "RUN_ID_KEY",
    "checkpoint_run_id",
    "folder_run_id",
    "log_run_id",
    "model_metadata",
    "new_run_id",
    "share",
    "stamp_model",
]

RUN_ID_KEY = "run_id"
"""The key of a training checkpoint that holds its run's id."""

MODEL_METADATA_KEY = "otface"
"""The entry of ``model.pt``'s ``state_dict._metadata`` that holds ``run_id`` and
``global_step``; ``load_state_dict`` looks entries up by module name, so it is ignored there
(no module is called ``otface``) and the file stays a plain ``state_dict`` for arcface_torch."""

LOG_NAME = "training.log"

# "==== run started 2026-12-07 14:00:00: ... (run 20261207-140000-1a2b3c, resume = ...) ===="
_HEADER_RE = re.compile(r"==== run started .*\(run (?P<run_id>[0-9A-Za-z_-]+), ")


def new_run_id() -> str:
    """A fresh id: the start time and six random hex digits, e.g. ``20261207-140000-1a2b3c``
    (sortable by start, unique across starts in the same second)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def log_run_id(path: str) -> str | None:
    """The id in the last ``==== run started`` header of the log at ``path``; ``None`` when
    the log is missing or has no header with an id (written before run ids)."""
    found = None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if "==== run started" in line:
                    match = _HEADER_RE.search(line)
                    found = match["run_id"] if match else found
    except OSError:
        return None
    return found


def checkpoint_run_id(path: str) -> str | None:
    """The run id of the checkpoint at ``path``: from its sidecar, else from the file itself
    (memory-mapped: no tensor is read); ``None`` when neither says (missing, unreadable or
    written before run ids)."""
    run_id = sidecar_run_id(path)
    if run_id is not None:
        return run_id
    state = read_header(path)
    value = state.get(RUN_ID_KEY) if state is not None else None
    return str(value) if value else None


def folder_run_id(output: str) -> str | None:
    """The run that ``output`` holds: the one its ``training.log`` last started or resumed,
    else the one rank 0's newest checkpoint (then its previous one) belongs to; ``None`` when
    nothing there names a run."""
    found = log_run_id(os.path.join(output, LOG_NAME))
    if found is not None:
        return found
    for path in (checkpoint_path(output, 0), previous_checkpoint_path(output, 0)):
        found = checkpoint_run_id(path)
        if found is not None:
            return found
    return None


def stamp_model(state_dict: dict[str, Any], *, run_id: str | None, global_step: int) -> None:
    """Record ``run_id`` and ``global_step`` in ``state_dict``'s metadata (see
    :data:`MODEL_METADATA_KEY`), in place."""
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is None:
        return
    metadata[MODEL_METADATA_KEY] = {"run_id": run_id, "global_step": int(global_step)}


def model_metadata(state_dict: Any) -> dict[str, Any]:
    """What :func:`stamp_model` recorded in a loaded ``model.pt``; ``{}`` for one written by
    arcface_torch or before run ids."""
    metadata = getattr(state_dict, "_metadata", None) or {}
    record = metadata.get(MODEL_METADATA_KEY)
    return dict(record) if isinstance(record, dict) else {}


def share(value: Any, *, distributed: bool) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself without a process group)."""
    if not distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
