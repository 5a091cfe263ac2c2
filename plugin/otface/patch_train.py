"""Training inside an arcface_torch checkout: what the overlay's ``train_otface.py`` runs.

The checkout supplies the configs and the networks; this package supplies the rest (registry
losses, P×K sampler, mxnet-free reader, Partial FC, checkpoints in arcface_torch's format):

- the config is arcface_torch's overlay, ``configs/base.py`` of the checkout updated by the job
  config, on top of this project's defaults for the keys that base lacks (``loss``,
  ``sampler``, ``otface``, ``save_every_steps``, ...), then validated like ours;
- the backbone is the checkout's ``backbones.get_model(name, dropout=0.0, fp16=...,
  num_features=...)``, so networks added to that tree train too;
- ``otface.layer = "auto"`` resolves for the checkout's IResNet (``bn2``) and MobileFaceNet
  (``conv_sep``, the 1×1 conv block feeding its GDC head).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

import torch
from easydict import EasyDict as edict
from torch import nn

from otface.config import (
    _SCHEMA,
    ConfigError,
    _exec_config,
    _merge,
    _resolve_path,
    config_name,
    validate_config,
)

__all__ = [
    "defaults_file",
    "load_tree_config",
    "resolve_tree_layer",
    "tree_backbone_factory",
    "main",
]

# Modules that hold the high-level feature map in the checkout's networks, by module name:
# IResNet ends its conv trunk with the BatchNorm ``bn2`` (512×7×7); MobileFaceNet's last 1×1
# conv block before the GDC head (``features``) is ``conv_sep`` (512×7×7).
_AUTO_LAYERS = ("bn2", "conv_sep")


def defaults_file() -> Path:
    """This project's ``configs/base.py`` (every key's default), found from the package.

    The package is installed editable from its checkout (``pip install -e .``), whose layout
    is ``plugin/otface/`` beside ``configs/``.
    """
    path = Path(__file__).resolve().parents[2] / "configs" / "base.py"
    if not path.is_file():
        raise ConfigError(
            f"otface's defaults {str(path)!r} not found: install otface from its source "
            "checkout with `pip install -e .` (the checkout holds configs/base.py)"
        )
    return path


def load_tree_config(path: str, *, tree: str | os.PathLike) -> edict:
    """Load a job config of an arcface_torch checkout.

    Order (later wins): this project's defaults, the checkout's ``configs/base.py`` (keys this
    project does not know are ignored, with one warning), the job config (sections such as
    ``otface`` merged key by key). ``output`` defaults to ``work_dirs/NAME``.

    Args:
        path: ``configs/NAME`` or a ``.py`` file, relative to the working directory or to
            ``tree``.
        tree: the arcface_torch checkout.

    Raises:
        ConfigError: a missing file, an unknown key in the job config, a bad value.
    """
    tree = Path(tree)
    try:
        file = _resolve_path(path)
    except ConfigError:
        if os.path.isabs(path):
            raise
        file = _resolve_path(str(tree / path))
    cfg = edict(_exec_config(str(defaults_file())))
    their_base = tree / "configs" / "base.py"
    if not their_base.is_file():
        raise ConfigError(f"{their_base}: not found (an arcface_torch checkout has it)")
    base = _exec_config(str(their_base))
    heads = {key.split(".")[0] for key in _SCHEMA}
    unknown = sorted(key for key in base if key not in heads)
    if unknown:
        warnings.warn(
            f"{their_base}: keys unknown to otface are ignored: {', '.join(unknown)}",
            stacklevel=2,
        )
    _merge(cfg, {k: v for k, v in base.items() if k in heads}, str(their_base))
    if os.path.abspath(file) != os.path.abspath(their_base):
        _merge(cfg, _exec_config(file), file)
    cfg = edict(cfg)
    validate_config(cfg, source=file)
    if cfg.output is None:
        cfg.output = os.path.join("work_dirs", config_name(file))
    return cfg


def resolve_tree_layer(model: nn.Module, layer: str) -> str:
    """``otface.layer`` for a network of the checkout: ``"auto"`` becomes the first of
    ``bn2`` (IResNet) and ``conv_sep`` (MobileFaceNet) the model has; other values and
    networks with a ``feature_layer`` attribute are left to :mod:`otface.hooks`."""
    if layer != "auto" or getattr(type(model), "feature_layer", None) is not None:
        return layer
    names = {name for name, _ in model.named_modules()}
    for name in _AUTO_LAYERS:
        if name in names:
            return name
    return layer


def tree_backbone_factory(tree: str | os.PathLike):
    """A ``factory(cfg, device)`` building ``cfg.network`` with the checkout's ``get_model``.

    It also resolves ``cfg.otface.layer = "auto"`` for that network (the OTFace hook reads it
    when the criterion is built, after the backbone).
    """
    tree = str(Path(tree).resolve())

    def factory(cfg, device: torch.device) -> nn.Module:
        if tree not in sys.path:
            sys.path.insert(0, tree)
        backbones = importlib.import_module("backbones")
        fp16 = bool(cfg.fp16) and device.type == "cuda"
        try:
            model = backbones.get_model(
                cfg.network, dropout=0.0, fp16=fp16, num_features=cfg.embedding_size
            )
        except ValueError as err:
            raise ConfigError(
                f"key 'network' = {cfg.network!r}: {os.path.join(tree, 'backbones')}'s "
                f"get_model does not build it ({type(err).__name__}: {err})"
            ) from None
        cfg.otface.layer = resolve_tree_layer(model, cfg.otface.layer)
        return model.to(device)

    return factory


def main(config_path: str, *, tree: str | os.PathLike, resume: bool = False) -> int:
    """Train ``config_path`` of the checkout ``tree`` (continuing the run in its output folder
    when ``resume``); returns a process exit code."""
    from otface.train.run import main as train_main

    return train_main(
        config_path,
        load=lambda path: load_tree_config(path, tree=tree),
        backbone_factory=tree_backbone_factory(tree),
        resume=resume,
    )
