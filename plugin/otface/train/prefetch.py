"""Batches on the device one step ahead: the copy of batch ``t + 1`` overlaps step ``t``.

The loader hands out pinned ``uint8`` batches on CUDA runs. :class:`DevicePrefetcher` copies
the next one to the GPU on a side stream (non-blocking), puts it in the training layout and
normalises it there, while the current step's kernels run on the main stream. On the CPU it
hands the loader's batches through unchanged.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch

from otface.data.datasets import normalize_images

__all__ = ["DevicePrefetcher", "to_training_layout"]

Batch = tuple[torch.Tensor, torch.Tensor]


def to_training_layout(
    img: torch.Tensor, labels: torch.Tensor, device: torch.device, *, channels_last: bool
) -> Batch:
    """``(img, labels)`` on ``device``: float32 in ``[-1, 1]`` (``uint8`` pixels normalised
    there), channels_last when asked. Copies are non-blocking (the loader pins on CUDA)."""
    img = img.to(device, non_blocking=True)
    if channels_last:
        # Before the normalisation: it keeps the layout, and uint8 is 4x cheaper to permute.
        img = img.contiguous(memory_format=torch.channels_last)
    if img.dtype == torch.uint8:
        img = normalize_images(img)
    return img, labels.to(device, non_blocking=True)


class DevicePrefetcher:
    """Iterate a loader's ``(img, labels)`` as device tensors, one batch ahead.

    Args:
        loader: any iterable of ``(img, labels)`` CPU batches (pinned for a real overlap).
        device: the training device; anything but CUDA passes the batches through.
        channels_last: the backbone's input layout (see :func:`to_training_layout`).
    """

    def __init__(
        self, loader: Iterable[Batch], device: torch.device, *, channels_last: bool
    ) -> None:
        self.loader = loader
        self.device = device
        self.channels_last = channels_last

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type != "cuda":
            yield from self.loader
            return
        side = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        batches = iter(self.loader)
        ahead = self._issue(batches, side)
        while ahead is not None:
            main.wait_stream(side)
            img, labels = ahead
            # Allocated on the side stream, used on the main one: the caching allocator must
            # not hand their memory out again before the main stream is done with them.
            img.record_stream(main)
            labels.record_stream(main)
            ahead = self._issue(batches, side)
            yield img, labels

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def _issue(self, batches: Iterator[Batch], side: torch.cuda.Stream) -> Optional[Batch]:
        try:
            img, labels = next(batches)
        except StopIteration:
            return None
        with torch.cuda.stream(side):
            return to_training_layout(img, labels, self.device, channels_last=self.channels_last)
