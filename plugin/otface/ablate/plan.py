"""What an ablation runs: arms (a config plus its overrides) × seeds, each in its own folder.

An override is ``KEY=VALUE`` with a dotted key (``otface.distance=entropic``); the value is read
as a Python literal (``0.5``, ``(1.0, 0.0, 0.4)``, ``True``) and otherwise taken as a string.
``N:KEY=VALUE`` applies to the N-th config of the command line only, which is how one config is
swept: ``configs/demo_otface configs/demo_otface --set 2:otface.distance=entropic``.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import os
import pprint
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from easydict import EasyDict as edict

from otface.config import ConfigError, config_name, load_config, validate_config

__all__ = [
    "Override",
    "Arm",
    "Run",
    "parse_override",
    "make_arms",
    "plan_runs",
    "frozen_config_text",
    "write_frozen_config",
]

_ARM_PREFIX = re.compile(r"^(\d+):(.*)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]+")


@dataclass(frozen=True)
class Override:
    """``key = value`` (dotted key), for every arm (``arm`` None) or the arm at that 1-based
    position; ``text`` is how it was written."""

    key: str
    value: Any
    arm: Optional[int]
    text: str


@dataclass(frozen=True)
class Arm:
    """One config of the comparison, with the overrides that are its own."""

    label: str
    config_path: str
    own: Tuple[Override, ...] = ()


@dataclass
class Run:
    """One training job: an arm at one seed, with its validated config and folder."""

    arm: Arm
    seed: int
    cfg: edict
    folder: Path
    digest: str = field(default="")


def parse_override(text: str) -> Override:
    """``[N:]KEY=VALUE`` → :class:`Override`.

    Raises:
        ValueError: no ``=``, an empty key, or ``N`` below 1.
    """
    arm = None
    body = text
    m = _ARM_PREFIX.match(text)
    if m:
        arm, body = int(m.group(1)), m.group(2)
        if arm < 1:
            raise ValueError(f"--set {text!r}: config numbers start at 1")
    key, sep, raw = body.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE or N:KEY=VALUE")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return Override(key, value, arm, text)


def _apply(cfg: dict, override: Override) -> None:
    *sections, leaf = override.key.split(".")
    node = cfg
    for depth, name in enumerate(sections):
        node = node.get(name)
        if not isinstance(node, dict):
            where = ".".join(sections[: depth + 1])
            raise ConfigError(f"--set {override.text!r}: '{where}' is not a config section")
    node[leaf] = override.value


def _label(config_path: str, own: Sequence[Override]) -> str:
    label = config_name(config_path)
    for o in own:
        label += "+" + _UNSAFE.sub("_", f"{o.key}={o.value!r}".replace("'", ""))
    return label


def make_arms(config_paths: Sequence[str], overrides: Sequence[Override]) -> List[Arm]:
    """The arms in command-line order; an override ``N:`` beyond the configs is an error, and
    so are two arms that would be the same run."""
    for o in overrides:
        if o.arm is not None and o.arm > len(config_paths):
            raise ValueError(
                f"--set {o.text!r} names config {o.arm}, but only {len(config_paths)} were given"
            )
    arms = []
    for k, path in enumerate(config_paths, start=1):
        own = tuple(o for o in overrides if o.arm == k)
        arms.append(Arm(_label(path, own), path, own))
    labels = [a.label for a in arms]
    for label in labels:
        if labels.count(label) > 1:
            raise ValueError(
                f"config {label!r} is listed twice with the same overrides; give one of them its "
                "own with --set N:KEY=VALUE"
            )
    return arms


def plan_runs(
    arms: Sequence[Arm],
    seeds: Sequence[int],
    output: Path,
    *,
    shared: Sequence[Override] = (),
    epochs: Optional[int] = None,
) -> List[Run]:
    """Every arm × seed, seed-major (all arms of the first seed first, so an ablation stopped
    early still holds paired runs), each config loaded, overridden and validated up front.

    Shared overrides apply first, an arm's own next, ``epochs`` (the shortened schedule) last.
    The ablation also sets ``seed``, ``output`` (``OUTPUT/LABEL/seedS``) and
    ``save_all_states = True`` so that a killed run resumes from its last epoch.

    Raises:
        ConfigError: a config or override that is not valid, naming it.
    """
    runs = []
    for seed in seeds:
        for arm in arms:
            cfg = load_config(arm.config_path)
            for o in (*shared, *arm.own):
                _apply(cfg, o)
            if epochs is not None:
                cfg.num_epoch = int(epochs)
                cfg.warmup_epoch = min(cfg.warmup_epoch, max(epochs - 1, 0))
            folder = output / arm.label / f"seed{seed}"
            cfg.seed = int(seed)
            cfg.output = str(folder)
            cfg.save_all_states = True
            cfg.resume = False
            cfg = edict(cfg)
            validate_config(cfg, source=f"{arm.config_path} with the ablation's overrides")
            run = Run(arm, int(seed), cfg, folder)
            run.digest = hashlib.sha256(frozen_config_text(cfg).encode()).hexdigest()[:16]
            runs.append(run)
    return runs


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def frozen_config_text(cfg: dict, *, resume: bool = False) -> str:
    """A complete config file (every key, nothing left to ``base.py``) for one run.

    ``resume`` is set from the argument; the rest of the text depends only on ``cfg``.
    """
    plain = _plain(copy.deepcopy(dict(cfg)))
    plain["resume"] = bool(resume)
    body = pprint.pformat(plain, width=100, sort_dicts=True)
    return (
        '"""One run of an ablation (written by otface.ablate): every key resolved."""\n\n'
        "from easydict import EasyDict as edict\n\n"
        f"config = edict({body})\n"
    )


def write_frozen_config(run: Run, *, resume: bool) -> str:
    """Writes ``FOLDER/config.py`` for ``run``; returns its path."""
    run.folder.mkdir(parents=True, exist_ok=True)
    path = run.folder / "config.py"
    tmp = run.folder / "config.py.tmp"
    tmp.write_text(frozen_config_text(run.cfg, resume=resume), encoding="utf-8")
    os.replace(tmp, path)
    return str(path)
