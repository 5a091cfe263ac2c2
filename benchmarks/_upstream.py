"""arcface_torch's own training step, loaded from a checkout the user names, for bench_step.py.

Nothing of arcface_torch is copied here: :func:`load_arcface_torch` imports its ``backbones``
package, ``losses.py`` and ``partial_fc_v2.py`` from the given folder at run time, under private
module names (``_arcface_torch_*``), so they can neither shadow nor be shadowed by modules of
this repository (both have a ``configs`` folder; these three files import only torch). The
folder is not put on ``sys.path``.

:class:`UpstreamStep` repeats the body of ``train_v2.py``'s loop for one GPU: backbone,
``PartialFC_V2`` (which needs a process group, even of one rank: :func:`single_process_group`),
``GradScaler`` with ``growth_interval=100``, unscale, ``clip_grad_norm_(backbone, 5)``, step,
update, ``zero_grad`` and the ``loss.item()`` that feeds its running average. Left out, as for
our contenders: the DDP wrapper, the LR schedule, logging and data loading.

arcface_torch's ``backbones/vit.py`` imports ``DropPath``, ``to_2tuple`` and ``trunc_normal_``
from timm, which needs torchvision. Where timm is not installed, :func:`_timm_stand_in` puts a
small stand-in in ``sys.modules`` while upstream's ``get_model`` imports its ViT, and takes it
out again: the same three helpers, written after timm's (``DropPath`` does timm's per-sample
stochastic depth, so the timed step is upstream's), nothing else of timm.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist

__all__ = ["ArcfaceTorch", "UpstreamStep", "load_arcface_torch", "single_process_group"]

_TIMM_MODULES = ("timm", "timm.models", "timm.models.layers")

_FILES = ("backbones/__init__.py", "losses.py", "partial_fc_v2.py")
_GRAD_CLIP_NORM = 5.0  # train_v2.py's clip_grad_norm_ bound
_SCALE = 64.0  # train_v2.py's CombinedMarginLoss scale


class ArcfaceTorch(NamedTuple):
    """The three pieces of an arcface_torch checkout the benchmark uses."""

    root: Path
    backbones: ModuleType
    losses: ModuleType
    partial_fc_v2: ModuleType


def _checkout_root(path: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--arcface-torch {path}: no such folder")
    # The insightface repository holds arcface_torch under recognition/.
    nested = root / "recognition" / "arcface_torch"
    if not (root / "partial_fc_v2.py").is_file() and nested.is_dir():
        root = nested
    missing = [name for name in _FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"--arcface-torch {path}: not an arcface_torch checkout, missing "
            f"{', '.join(missing)} (expected the folder of train_v2.py)"
        )
    return root


def _import(root: Path, relative: str, name: str) -> ModuleType:
    file = root / relative
    package = [str(file.parent)] if file.name == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=package)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the backbones package's relative imports look it up
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ImportError(f"--arcface-torch: importing {file} failed: {err!r}") from err
    return module


def load_arcface_torch(path: str) -> ArcfaceTorch:
    """Import arcface_torch's ``backbones``, ``losses`` and ``partial_fc_v2`` from ``path``.

    Args:
        path: an arcface_torch checkout (the folder of ``train_v2.py``), or an insightface
            checkout holding it under ``recognition/arcface_torch``.

    Raises:
        FileNotFoundError: the folder, or one of the three files, is missing.
        ImportError: one of them failed to import, or lacks ``get_model``,
            ``CombinedMarginLoss`` or ``PartialFC_V2``.
    """
    root = _checkout_root(path)
    mods = ArcfaceTorch(
        root,
        _import(root, "backbones/__init__.py", "_arcface_torch_backbones"),
        _import(root, "losses.py", "_arcface_torch_losses"),
        _import(root, "partial_fc_v2.py", "_arcface_torch_partial_fc_v2"),
    )
    for module, attr in (
        (mods.backbones, "get_model"),
        (mods.losses, "CombinedMarginLoss"),
        (mods.partial_fc_v2, "PartialFC_V2"),
    ):
        if not hasattr(module, attr):
            raise ImportError(f"--arcface-torch {path}: {module.__file__} has no {attr}")
    return mods


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A one-rank process group (NCCL on CUDA, gloo on CPU) unless one exists already."""
    if dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


class _DropPath(torch.nn.Module):
    """timm's ``DropPath``: in training, each sample's branch is zeroed with probability
    ``drop_prob`` and the kept ones scaled by ``1 / (1 - drop_prob)``."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            keep.div_(keep_prob)
        return x * keep


def _to_2tuple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


@contextlib.contextmanager
def _timm_stand_in() -> Iterator[bool]:
    """While open, ``import timm.models.layers`` finds the stand-in when timm is not installed
    (yields whether it is in use); nothing is left in ``sys.modules`` afterwards."""
    if importlib.util.find_spec("timm") is not None:
        yield False
        return
    layers = ModuleType("timm.models.layers")
    layers.DropPath = _DropPath
    layers.to_2tuple = _to_2tuple
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    stand_in = dict(zip(_TIMM_MODULES, (ModuleType("timm"), ModuleType("timm.models"), layers)))
    sys.modules.update(stand_in)
    try:
        yield True
    finally:
        for name in _TIMM_MODULES:
            sys.modules.pop(name, None)


@contextlib.contextmanager
def _tensor_cuda_is_identity() -> Iterator[None]:
    # PartialFC_V2 moves its buffers with `.cuda()`: on a CPU-only run they stay where they are.
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


class UpstreamStep:
    """arcface_torch's model, Partial FC, optimiser and scaler, and its training step.

    Args:
        mods: the checkout's modules (:func:`load_arcface_torch`).
        cfg: our config (``configs.base`` updated with network, classes, fp16): both sides
            train with its values (arcface_torch's defaults) for the margins, Partial FC's
            sample rate, embedding size and SGD's learning rate, momentum and weight decay.
        device: where to run; a process group must exist (:func:`single_process_group`).
        state: backbone weights to start from (ours: the IResNet state_dicts match); on a
            mismatch the network keeps its own initialisation and :attr:`note` says why.
        centres: ``(num_classes, embedding_size)`` initial class centres, or None.
    """

    channels_last = False  # arcface_torch trains NCHW

    def __init__(
        self,
        mods: ArcfaceTorch,
        cfg,
        device: torch.device,
        state: dict,
        centres: Optional[torch.Tensor] = None,
    ):
        self.device = device
        self.fp16 = bool(cfg.fp16) and device.type == "cuda"
        with _timm_stand_in() as stand_in:
            self.backbone = mods.backbones.get_model(
                cfg.network, dropout=0.0, fp16=self.fp16, num_features=cfg.embedding_size
            )
        try:
            self.backbone.load_state_dict(state)
            self.note = f"upstream {cfg.network} starts from our initial weights"
        except RuntimeError as err:
            first = str(err).strip().splitlines()[1:2] or [str(err)]
            self.note = (
                f"upstream {cfg.network} keeps its own initialisation (our state_dict does "
                f"not load: {first[0].strip()})"
            )
        if stand_in and cfg.network.startswith("vit"):
            self.note += (
                " (timm is not installed: its DropPath, to_2tuple and trunc_normal_ come from "
                "the benchmark's stand-in)"
            )
        self.backbone.to(device).train()
        margin = mods.losses.CombinedMarginLoss(
            _SCALE, *cfg.margin_list, cfg.interclass_filtering_threshold
        )
        # train_v2.py passes fp16=False to PartialFC_V2 (its logits stay float32).
        self.partial_fc = mods.partial_fc_v2.PartialFC_V2(
            margin, cfg.embedding_size, cfg.num_classes, cfg.sample_rate, False
        )
        if centres is not None and centres.shape == self.partial_fc.weight.shape:
            with torch.no_grad():
                self.partial_fc.weight.copy_(centres)
        self.partial_fc.train().to(device)
        self.opt = torch.optim.SGD(
            [{"params": self.backbone.parameters()}, {"params": self.partial_fc.parameters()}],
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        self.scaler = torch.amp.GradScaler("cuda", growth_interval=100) if self.fp16 else None
        self._cpu = device.type != "cuda"
        # Its modules call torch.cuda.amp.autocast, deprecated in favour of torch.amp.autocast;
        # filtered once here rather than around every timed step.
        warnings.filterwarnings("ignore", r"`torch\.cuda\.amp\.autocast", FutureWarning)
        if self._cpu:  # its ViT's CUDA autocast regions, which are off on a CPU
            warnings.filterwarnings("ignore", "CUDA is not available", UserWarning)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        with _tensor_cuda_is_identity() if self._cpu else contextlib.nullcontext():
            loss = self.partial_fc(self.backbone(x), labels)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), _GRAD_CLIP_NORM)
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), _GRAD_CLIP_NORM)
                self.opt.step()
            self.opt.zero_grad()
        loss.item()  # train_v2.py's running average reads the loss every step
