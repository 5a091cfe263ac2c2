"""One rank's training step: forward, backward and, every ``gradient_acc`` batches, the
optimiser step; eagerly, or replayed as one CUDA graph (:mod:`otface.train.graph`)."""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch

from otface.config import ConfigError, cuda_graph_config_conflict
from otface.criterion import LossOutput
from otface.train.grad_share import GradientShareProbe
from otface.train.graph import StepGraph, forward_backward
from otface.train.optim import optimizer_step
from otface.train.prefetch import to_training_layout

__all__ = ["StepMixin"]


class StepMixin:
    """``train_step()``, the CUDA graph it may run, ``skipped_steps`` and ``lr`` of
    :class:`otface.train.loop.Trainer`.

    Reads ``cfg``, ``env``, ``device``, ``channels_last``, ``model``, ``backbone``,
    ``criterion``, ``optimizer``, ``grad_scaler``, ``lr_scheduler``, ``freezer``, ``skips``,
    ``log_start_step`` and the buffer snapshot ``_buffers``; advances ``global_step`` and sets
    ``_synced_once``.
    """

    def _build_step_graph(self, setting: str) -> StepGraph | None:
        """Config ``cuda_graph``: the step's forward and backward as one CUDA graph
        (:mod:`otface.train.graph`) where it can run; ``"on"`` where it cannot is an error."""
        if setting == "off":
            return None
        why = cuda_graph_config_conflict(self.cfg)
        if not why and self.device.type != "cuda":
            why = f"the device is {self.device.type}, and CUDA graphs need CUDA"
        if not why and self.env.distributed:
            why = (
                f"{self.env.world_size} processes: recording the step under DDP is not "
                "supported yet (one process only)"
            )
        if not why and not hasattr(self.criterion, "prepare_step"):
            why = (
                f"loss {self.cfg.loss!r}: its criterion has no prepare_step(step), so what "
                "changes with the step cannot reach a recorded forward"
            )
        if why:
            if setting == "on":
                raise ConfigError(f"key 'cuda_graph' = 'on' cannot be used: {why}")
            logging.info("cuda_graph = 'auto': off, %s", why)
            return None
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return StepGraph(
            functools.partial(forward_backward, self.model, self.criterion, self.grad_scaler),
            params,
            warmup=3,
        )

    @property
    def skipped_steps(self) -> int:
        """Optimiser steps skipped for a non-finite loss or gradient, in all."""
        return self.skips.total

    def train_step(self, img: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """Forward, backward and (every ``gradient_acc`` batches) an optimiser step.

        ``img`` is float32 in ``[-1, 1]`` or ``uint8`` pixels (normalised on the device).

        ``self.global_step`` counts batches; it is advanced here, before the forward. With
        gradient accumulation, DDP all-reduces only on the last batch of each accumulation.
        """
        self.global_step += 1
        cfg = self.cfg
        acc = cfg.gradient_acc
        if (self.global_step - 1) % acc == 0:  # first batch of an accumulation
            self._buffers.take()
        update = self.global_step % acc == 0
        # The loader hands uint8 batches to CUDA runs (pinned, 4x fewer bytes to copy); the
        # prefetcher has usually moved and normalised them already, and then this is a no-op.
        img, labels = to_training_layout(img, labels, self.device, channels_last=self.channels_last)
        self.freezer.before_forward(self.global_step, self.backbone.training)
        if self.step_graph is not None:  # one process, gradient_acc 1: every batch updates
            self.criterion.prepare_step(self.global_step)
            out = self.step_graph(img, labels)
        else:
            out = self._eager_forward_backward(img, labels, update=update, acc=acc)
        if update:
            self.freezer.drop_gradients(self.global_step)
        skipped = update and not optimizer_step(
            self.optimizer,
            self.backbone,
            grad_scaler=self.grad_scaler,
            buffers=self._buffers,
            skips=self.skips,
            global_step=self.global_step,
            keep_grads=self.step_graph is not None and self.step_graph.keeps_gradients,
        )
        with warnings.catch_warnings():
            if skipped or not update:
                # The schedule counts batches (as arcface_torch); torch warns when it moves on
                # without an optimiser step, which skips and accumulation do by design.
                warnings.simplefilter("ignore", UserWarning)
            self.lr_scheduler.step()
        metrics = dict(out.metrics)
        metrics["loss"] = out.loss.detach()
        return LossOutput(out.loss, metrics)

    def _eager_forward_backward(
        self, img: torch.Tensor, labels: torch.Tensor, *, update: bool, acc: int
    ) -> LossOutput:
        # DDP's static graph records its first step with gradient hooks on: no_sync only after.
        no_sync = getattr(self.model, "no_sync", None) if self._synced_once else None
        with no_sync() if (no_sync is not None and not update) else contextlib.nullcontext():
            embeddings = self.model(img)
            out = self.criterion(embeddings, labels, step=self.global_step)
            logged = (
                self.global_step % self.cfg.frequent == 0
                or self.global_step == self.log_start_step + 1
            )
            scaler = self.grad_scaler

            def scale(t: torch.Tensor) -> torch.Tensor:
                """What the backward differentiates: the share of the accumulated step, scaled
                for fp16."""
                t = t / acc if acc > 1 else t
                return scaler.scale(t) if scaler is not None else t

            probe = None
            if out.terms is not None and logged:
                # On log steps only: the OT term's gradient beside the margin loss's.
                probe = GradientShareProbe(out.terms, list(self.backbone.parameters()), scale=scale)
            try:
                scale(out.loss).backward()
            finally:
                if probe is not None:
                    probe.remove()
            shares = probe.finish() if probe is not None else {}
        self._synced_once = self._synced_once or update
        return LossOutput(out.loss, {**out.metrics, **shares})

    @property
    def lr(self) -> float:
        # The last parameter group's: Partial FC's centres, at the config's lr (the backbone's
        # differs by backbone_lr_mult).
        return self.lr_scheduler.get_last_lr()[-1]
