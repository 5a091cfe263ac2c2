"""Our training step as a benchmark contender: backbone, criterion, optimiser and fp16 scaler
built as the trainer builds them, from given backbone weights, and the batches it runs on.

Shared by ``bench_step.py`` and ``profile_step.py``.
"""

from __future__ import annotations

import functools

import torch
from _timing import base_config

from otface.backbones import get_model, set_fused_bn_prelu, use_channels_last
from otface.registry import LOSSES
from otface.train.graph import StepGraph, forward_backward
from otface.train.loop import GRAD_CLIP_NORM, compile_backbone

__all__ = ["Step", "bench_config", "make_batches"]


def bench_config(args, loss_name: str = "arcface", head: str = "combined"):
    cfg = base_config()
    cfg.update(
        network=args.network,
        num_classes=args.num_classes,
        fp16=args.fp16,
        loss=loss_name,
        head=head,
    )
    return cfg


class Step:
    """Backbone, criterion, optimiser and fp16 scaler of one contender, and its step."""

    def __init__(
        self,
        loss_name: str,
        args,
        device: torch.device,
        state: dict,
        kernel: str,
        *,
        as_trainer: bool = False,
        compile_mode: str | None = None,
        fused_bn_prelu: bool = False,
        compile_scope: str = "blocks",
        cuda_graph: bool = False,
        head: str = "combined",
    ):
        cfg = bench_config(args, loss_name, head)
        cfg.otface.kernel = kernel
        # as_trainer: the trainer's learning rate and gradient clipping (as arcface_torch's
        # step, for the comparison with it); otherwise the plain step of the overhead table.
        self.as_trainer = as_trainer
        self.backbone = get_model(args.network, fp16=args.fp16, num_features=cfg.embedding_size)
        self.backbone.load_state_dict(state)
        self.backbone.to(device).train()
        self.channels_last = use_channels_last(args.channels_last, device)
        if self.channels_last:  # as the trainer does (config.channels_last)
            self.backbone.to(memory_format=torch.channels_last)
        if fused_bn_prelu:  # as the trainer does (config.fused_bn_prelu = "auto")
            set_fused_bn_prelu(self.backbone, "auto")
        if compile_mode:  # as the trainer does (config.compile): before the feature hook
            # (compile_backbone makes Dynamo guard on hooks: the compiled backbones of several
            # rows share its cache, and otface's would otherwise run arcface's hook-less graph)
            compile_backbone(
                self.backbone, True if compile_mode == "default" else compile_mode, compile_scope
            )
        self.criterion = LOSSES.build(
            loss_name, cfg, backbone=self.backbone, rank=0, world_size=1
        ).to(device)
        params = list(self.backbone.parameters()) + list(self.criterion.parameters())
        lr, momentum = (cfg.lr, cfg.momentum) if as_trainer else (0.01, 0.9)
        self.opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=5e-4)
        self.scaler = torch.amp.GradScaler("cuda") if args.fp16 and device.type == "cuda" else None
        # As the trainer with config.cuda_graph: forward + backward recorded, optimiser eager.
        self.graph = None
        if cuda_graph:
            fn = functools.partial(forward_backward, self.backbone, self.criterion, self.scaler)
            self.graph = StepGraph(fn, params)

    def batches(self, args, device: torch.device, count: int):
        return make_batches(args, device, count, channels_last=self.channels_last)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, step: int):
        if self.graph is not None:
            self.criterion.prepare_step(step)
            out = self.graph(x, labels)
        else:
            out = self.criterion(self.backbone(x), labels, step=step)
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(out.loss).backward()
            else:
                out.loss.backward()
        finite = self._clip() if self.as_trainer else True
        if self.scaler is not None:
            if finite:
                self.scaler.step(self.opt)
            self.scaler.update()
        elif finite:
            self.opt.step()
        if self.graph is not None and not self.graph.keeps_gradients:
            self.opt.zero_grad(set_to_none=True)  # the next warm-up step starts from None
        return out

    def _clip(self) -> bool:
        # As the trainer's optimiser step: unscale, clip the backbone's gradient norm, and read
        # whether it is finite (its one host read per step).
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), GRAD_CLIP_NORM)
        return bool(torch.isfinite(norm))


def make_batches(args, device: torch.device, count: int, *, channels_last: bool):
    # A fresh batch each step (the same sequence for every contender): reusing one batch
    # lets the model fit it within a few steps and leaves nothing hard to mine.
    g = torch.Generator().manual_seed(0)
    per = args.batch_size // args.k
    out = []
    for _ in range(count):
        x = torch.randn(args.batch_size, 3, 112, 112, generator=g).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ids = torch.randperm(args.num_classes, generator=g)[:per].repeat_interleave(args.k)
        out.append((x, ids.to(device)))
    return out
