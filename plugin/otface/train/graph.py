"""The forward and backward of a training step as one CUDA graph.

On a GPU, an eager r100 step launches about 2,500 kernels; when the host cannot launch them as
fast as the GPU runs them, the GPU waits between kernels (``benchmarks/profile_step.py``'s
"busy" figure). :class:`StepGraph` records the step's forward, criterion and (scaled) backward
once with :func:`torch.cuda.graph` and then replays the recording: one launch instead of
thousands. The optimiser step (unscale, clip, the finite check, SGD) stays eager, after the
replay, so the learning-rate schedule, the grad scaler and the skip-on-overflow logic are
unchanged.

What a replay needs, and this module arranges:

- **Static inputs.** The batch is copied into the buffers the graph was recorded on.
- **Nothing from the host inside.** A replay repeats the recorded kernels with the recorded
  arguments, so a Python number that changes from step to step (OTFace's lambda warm-up) must
  reach the step through a device tensor that is filled before the replay: the criterion's
  ``prepare_step(step)`` does that, and the recorded forward is called with ``step=None``.
- **Gradients that stay put.** The backward is recorded while every gradient is ``None``, so it
  writes (not accumulates) each ``.grad`` into memory of the graph's pool; a replay overwrites
  them. The optimiser step must therefore not set gradients to ``None`` afterwards
  (:attr:`StepGraph.keeps_gradients`).
- **Outputs copied out.** The loss and the metrics are packed into one tensor inside the graph
  and copied out after each replay, so that a caller keeping them (the log's running sums) is
  not overwritten by the next replay.

The first ``warmup`` calls run eagerly on a side stream (cuDNN picks its algorithms, the grad
scaler and the optimiser create their state, Triton compiles its kernels), as CUDA graphs
require; the next call records the graph and replays it. A batch of another shape or dtype is
run eagerly (its gradients written into the graph's gradient buffers). If recording fails, the
error is logged once and every later step runs eagerly.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

import torch

from otface.criterion import LossOutput

__all__ = ["ForwardBackward", "StepGraph", "forward_backward"]

# forward_backward(img, labels) -> LossOutput: the backbone, the criterion (called with
# step=None) and loss.backward() (scaled under fp16), for one batch.
ForwardBackward = Callable[[torch.Tensor, torch.Tensor], LossOutput]


def forward_backward(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    grad_scaler: Optional[torch.amp.GradScaler],
    img: torch.Tensor,
    labels: torch.Tensor,
) -> LossOutput:
    """The part of a step that :class:`StepGraph` records: the backbone, the criterion with
    ``step=None`` (its per-step values set by ``prepare_step``) and the backward, scaled by
    ``grad_scaler`` when there is one."""
    out = criterion(model(img), labels, step=None)
    if grad_scaler is not None:
        grad_scaler.scale(out.loss).backward()
    else:
        out.loss.backward()
    return out


class StepGraph:
    """One training step's forward and backward, recorded once and replayed.

    Args:
        forward_backward: runs the backbone, the criterion and the backward on a batch and
            returns the criterion's :class:`~otface.criterion.LossOutput` (metrics are scalar
            tensors). It must make no host read and call nothing that changes with the step.
        params: every parameter that receives a gradient (the optimiser's).
        warmup: eager calls before the recording (at least 1).

    Call it with a batch on the GPU; it returns the loss and metrics of that batch as fresh
    tensors. :attr:`keeps_gradients` is True once the graph holds the gradients: from then on
    the caller's optimiser step must not set them to ``None``.
    """

    def __init__(
        self,
        forward_backward: ForwardBackward,
        params: Sequence[torch.nn.Parameter],
        *,
        warmup: int = 3,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (eager steps before recording), got {warmup}")
        self._fn = forward_backward
        self._params = [p for p in params if p.requires_grad]
        self.warmup = int(warmup)
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.failed: Optional[str] = None  # why recording failed, when it did
        self._static: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._packed: Optional[torch.Tensor] = None
        self._names: list[str] = []
        self._side: Optional[torch.cuda.Stream] = None
        self._warned_shape = False

    @property
    def keeps_gradients(self) -> bool:
        """Whether the gradients live in the graph (never set them to ``None`` then)."""
        return self.graph is not None

    @property
    def replaying(self) -> bool:
        """Whether the next call with a batch of the recorded shape replays the graph."""
        return self.graph is not None

    def __call__(self, img: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        self.calls += 1
        if img.device.type != "cuda":
            raise ValueError(f"StepGraph needs a CUDA batch, got one on {img.device}")
        if self.graph is not None:
            if self._matches(img, labels):
                return self._replay(img, labels)
            return self._eager_into_graph_grads(img, labels)
        if self.failed is not None or self.calls <= self.warmup:
            return self._eager(img, labels)
        return self._record(img, labels)

    # -- the three ways of running a step ---------------------------------------------------
    def _eager(self, img: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        if self.failed is not None:
            out = self._fn(img, labels)
            return LossOutput(out.loss.detach(), out.metrics)
        # Warm-up on a side stream, as torch.cuda.graph's documentation asks.
        if self._side is None:
            self._side = torch.cuda.Stream(device=img.device)
        main = torch.cuda.current_stream(img.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            out = self._fn(img, labels)
        main.wait_stream(self._side)
        # Detached: a loss kept by the caller would keep this step's autograd graph (and its
        # gradient accumulators, tied to the side stream) alive into the recording.
        return LossOutput(out.loss.detach(), out.metrics)

    def _record(self, img: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        for p in self._params:
            p.grad = None  # recorded while None: the backward writes each gradient afresh
        self._static = (img.clone(), labels.clone())
        started = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the DataLoader's pin-memory thread allocates pinned host memory
            # while the step runs; under the default "global" mode that call would invalidate
            # the recording (and fail in that thread). It never touches the recorded stream.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self._fn(*self._static)
                names = ["loss", *out.metrics]
                values = [out.loss.detach(), *out.metrics.values()]
                packed = torch.stack([v.reshape(()).float() for v in values])
        except Exception as err:  # noqa: BLE001 - any failure: fall back to eager steps
            self.failed = f"{type(err).__name__}: {err}"
            self._static = None
            for p in self._params:
                p.grad = None
            logging.warning(
                "cuda_graph: recording the step failed (%s); training on eagerly", self.failed
            )
            torch.cuda.synchronize(img.device)
            out = self._fn(img, labels)
            return LossOutput(out.loss.detach(), out.metrics)
        self.graph = graph
        self._names = names
        self._packed = packed
        logging.info(
            "cuda_graph: the step's forward and backward recorded after %d eager steps in "
            "%.1f s; replayed from now on",
            self.warmup,
            time.perf_counter() - started,
        )
        missing = [tuple(p.shape) for p in self._params if p.grad is None]
        if missing:
            logging.warning(
                "cuda_graph: %d parameters got no gradient in the recorded step (shapes %s)",
                len(missing),
                missing[:3],
            )
        return self._replay(img, labels)

    def _replay(self, img: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        static_img, static_labels = self._static
        static_img.copy_(img)
        static_labels.copy_(labels)
        self.graph.replay()
        values = self._packed.clone().unbind()
        metrics = dict(zip(self._names[1:], values[1:]))
        return LossOutput(values[0], metrics)

    def _eager_into_graph_grads(self, img: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        if not self._warned_shape:
            self._warned_shape = True
            logging.warning(
                "cuda_graph: a batch of shape %s (recorded: %s) runs eagerly (warned once)",
                tuple(img.shape),
                tuple(self._static[0].shape),
            )
        # The gradients must stay in the graph's buffers: zero them in place, accumulate into
        # them.
        with torch.no_grad():
            grads = [p.grad for p in self._params if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
        out = self._fn(img, labels)
        return LossOutput(out.loss.detach(), out.metrics)

    def _matches(self, img: torch.Tensor, labels: torch.Tensor) -> bool:
        static_img, static_labels = self._static
        return (
            img.shape == static_img.shape
            and img.dtype == static_img.dtype
            and img.stride() == static_img.stride()
            and labels.shape == static_labels.shape
            and labels.dtype == static_labels.dtype
        )
