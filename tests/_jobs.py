"""Test helpers that write job configs: ``configs/NAME.py`` beside a copy of this checkout's
``configs/base.py``, the layout ``load_config`` and ``train.py configs/NAME`` read."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["TINY_DEMO", "TINY_RUN", "configs_folder", "job_source", "write_job"]

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.py"

# The demo data's parts at a few identities each (otface.demo.generate_demo's sizes).
TINY_DEMO = dict(
    train_identities=3,
    images_per_identity=2,
    val_identities=4,
    val_images_per_identity=3,
    val_pairs=20,
    hard_identities=4,
    hard_images_per_identity=4,
    hard_pairs=20,
    ijb_identities=4,
    ijb_images_per_identity=5,
    ijb_impostor_pairs=10,
)

# A short run on the CPU: r18_lite on synthetic faces, 8 images a step, a log line every 2 steps,
# no verification, no DataLoader workers. Tests add the sizes and whatever they look at.
TINY_RUN = {
    "network": "r18_lite",
    "rec": "synthetic",
    "batch_size": 8,
    "lr": 0.05,
    "frequent": 2,
    "verbose": 100000,
    "val_targets": [],
    "num_workers": 0,
}


def configs_folder(folder: str | os.PathLike) -> Path:
    """``folder/configs``, made if needed, holding a copy of this checkout's ``base.py``."""
    configs = Path(folder) / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    shutil.copy(BASE, configs / "base.py")
    return configs


def job_source(keys: Mapping[str, Any] | None = None, extra: str = "") -> str:
    """The text of a job config: ``config.KEY = repr(value)`` for each of ``keys`` in order (a
    mapping becomes an ``edict`` section), then ``extra`` as it is."""
    lines = ["from easydict import EasyDict as edict", "config = edict()"]
    for key, value in (keys or {}).items():
        if isinstance(value, Mapping):
            fields = ", ".join(f"{field}={item!r}" for field, item in value.items())
            lines.append(f"config.{key} = edict({fields})")
        else:
            lines.append(f"config.{key} = {value!r}")
    return "\n".join(lines) + "\n" + extra


def write_job(
    folder: str | os.PathLike,
    name: str,
    keys: Mapping[str, Any] | None = None,
    *,
    extra: str = "",
) -> str:
    """Write ``folder/configs/NAME.py`` (see :func:`job_source`) beside ``base.py``.

    Returns:
        ``folder/configs/NAME``, as ``load_config`` and ``train.py`` take it.
    """
    configs = configs_folder(folder)
    (configs / f"{name}.py").write_text(job_source(keys, extra))
    return str(configs / name)
