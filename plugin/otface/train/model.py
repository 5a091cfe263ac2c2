"""The network a rank trains: the config's backbone, its memory format, ``torch.compile``, and
the DistributedDataParallel wrapper set up as arcface_torch's."""

from __future__ import annotations

import contextlib
import difflib
import warnings
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from otface.config import ConfigError

__all__ = [
    "COMPILE_SCOPES",
    "BackboneFactory",
    "apply_fused_bn_prelu",
    "build_backbone",
    "compile_backbone",
    "eager_stance",
    "resolve_channels_last",
    "wrap_ddp",
]

BackboneFactory = Callable[[Any, torch.device], nn.Module]


def build_backbone(cfg, device: torch.device) -> nn.Module:
    """The config's network; an unknown name is a :class:`ConfigError`."""
    from otface.backbones import get_model, list_models

    names = list_models()
    if cfg.network not in names:
        close = difflib.get_close_matches(cfg.network, names, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ConfigError(
            f"key 'network' = {cfg.network!r} is not a known backbone; {hint}"
            f"valid: {', '.join(names)}"
        )
    fp16 = bool(cfg.fp16) and device.type == "cuda"
    model = get_model(cfg.network, dropout=0.0, fp16=fp16, num_features=cfg.embedding_size)
    return model.to(device)


def resolve_channels_last(setting, device: torch.device) -> bool:
    """Whether the backbone runs NHWC (config ``channels_last``: ``"auto"``, True or False);
    a bad value is a :class:`ConfigError`."""
    from otface.backbones import use_channels_last

    try:
        return use_channels_last(setting, device)
    except ValueError as err:
        raise ConfigError(f"key {err}") from None


def apply_fused_bn_prelu(backbone: nn.Module, setting: str) -> int:
    """Config ``fused_bn_prelu``: the BatchNorm + PReLU pairs of an IResNet (its blocks and its
    stem) as one fused op each.

    Returns the number of modules switched. A network without IResNet blocks (``mbf``) is
    trained as it is, with a warning, since the key asks for something it cannot do.
    """
    if setting == "off":
        return 0
    from otface.backbones import set_fused_bn_prelu

    count = set_fused_bn_prelu(backbone, setting)
    if count == 0:
        warnings.warn(
            f"fused_bn_prelu = {setting!r}: the network has no IResNet block, nothing is fused",
            stacklevel=2,
        )
    return count


COMPILE_SCOPES = ("blocks", "network")


def compile_backbone(backbone: nn.Module, setting, scope: str = "blocks", **options) -> str:
    """``torch.compile`` the backbone in place (config ``compile``: False, True or a mode).

    In place (``Module.compile``, or the blocks' own), so the state_dict keys, the feature
    hook and DDP see the same module as without it.

    Args:
        backbone: the network, already in its memory format.
        setting: config ``compile``.
        scope: config ``compile_scope``. ``"blocks"``: the stem and each residual block are
            compiled on their own and identical blocks share one graph (see
            :meth:`otface.backbones.IResNet.compile_blocks`), so compilation takes about as
            long for r100 as for r18; a network without blocks to compile (``mbf``) is
            compiled whole. ``"network"``: the whole backbone as one graph.
        options: further :func:`torch.compile` arguments (``backend``: tests).

    Returns:
        What was compiled, for the log; ``""`` when ``setting`` is False.
    """
    if setting is False:
        return ""
    if not hasattr(backbone, "compile"):  # torch < 2.2 (requirements allow 2.1)
        raise ConfigError("key 'compile': needs torch >= 2.2 (nn.Module.compile)")
    if scope not in COMPILE_SCOPES:
        raise ConfigError(
            f"key 'compile_scope' = {scope!r}; valid: {', '.join(map(repr, COMPILE_SCOPES))}"
        )
    if setting is not True:
        options["mode"] = setting
    if scope == "blocks" and hasattr(backbone, "compile_blocks"):
        # Static shapes: the stages' blocks differ in size, and Dynamo would otherwise turn a
        # second size into a dynamic-shape graph for all of them.
        regions = backbone.compile_blocks(dynamic=False, **options)
        _configure_dynamo(regions)
        return f"{regions} regions (the stem and each residual block)"
    backbone.compile(**options)
    _configure_dynamo(1)
    return "the whole network"


def eager_stance() -> ContextManager:
    """A context in which compiled modules run their eager code (``torch.compiler.set_stance``
    ``"force_eager"``, torch >= 2.6; elsewhere nothing changes): for evaluation passes, which
    would otherwise compile graphs of their own."""
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _configure_dynamo(regions: int) -> None:
    """Dynamo settings for ``regions`` compiled regions (process-wide; they only widen).

    Guards on module hooks, which Dynamo skips by default: a block holding the OT term's
    feature hook (config otface.layer inside a block) would otherwise run the graph of an
    identical block without it, and the hook would never fire; so would a second backbone of
    the same class. And a recompile limit with room for every region: all blocks share
    ``Module._call_impl``, whose compiled variants Dynamo caps per code object (8 by default),
    so that none falls back to eager.
    """
    import torch._dynamo.config as dynamo_config

    dynamo_config.skip_nnmodule_hook_guards = False
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), regions))


def wrap_ddp(backbone: nn.Module, device: torch.device) -> nn.Module:
    """``backbone`` in DistributedDataParallel, as arcface_torch: 16 MB buckets, BatchNorm
    statistics per rank, fp16-compressed gradient all-reduce on CUDA, and a static graph.

    Call it with the process group joined, after the criterion is built.
    """
    # A static graph finds parameters unused by the loss on its first step by itself.
    model = nn.parallel.DistributedDataParallel(
        backbone,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=16,
        **_rank_local_buffers(),
    )
    if device.type == "cuda":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
            fp16_compress_hook,
        )

        model.register_comm_hook(None, fp16_compress_hook)
    model._set_static_graph()
    return model


def _rank_local_buffers() -> dict[str, bool]:
    """BatchNorm statistics stay per rank, as arcface_torch (``broadcast_buffers=False``;
    newer torch names it ``forward_sync_buffers`` and deprecates the old name)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
