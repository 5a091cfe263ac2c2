"""Data-path throughput: the ``.rec`` DataLoader against a plain JPEG-decoding loop.

Packs generated face-sized JPEGs (or uses the embedded demo set with ``--source demo``) into a
``.rec`` with the packer, then measures in the same run:

* ``loop``: one process decoding the same JPEG bytes from memory with OpenCV and normalising
  them to float32 CHW in ``[-1, 1]``, written plainly (no RecordIO, no flip, no batching);
* ``loader``: ``build_train_loader`` (P×K sampler, RecordIO reads, decode, flip, normalise,
  collate) with ``--workers`` worker processes.

Alternates the two for ``--epochs`` rounds and prints median images/s and their ratio
(target >= 0.8), and the time the P×K sampler takes to
plan one MS1MV3-sized epoch (5,179,510 images, 93,431 identities, 8 ranks × 128).

    python benchmarks/bench_data.py [--images 4096] [--workers 2] [--source demo|generated]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from easydict import EasyDict as edict

from otface.data import build_train_loader, dataset_info
from otface.data.rec_writer import write_rec
from otface.data.recordio import IndexedRecordReader, unpack_payload
from otface.data.sampler import PKBatchSampler


def _generated_rec(root: Path, num_images: int, per_identity: int) -> Path:
    """Smooth face-sized images (coarse colour field + mild noise), JPEG quality 95."""
    rng = np.random.default_rng(0)

    def samples():
        for i in range(num_images):
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = cv2.resize(coarse, (112, 112), interpolation=cv2.INTER_CUBIC)
            img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            yield i // per_identity, buf.tobytes()

    write_rec(root, samples())
    return root


def _jpeg_bytes(root: Path) -> list[bytes]:
    reader = IndexedRecordReader(root / "train.rec", root / "train.idx")
    head = reader.read_header(0)
    keys = range(1, int(head.label[0])) if head.flag >= 2 else reader.keys.tolist()
    return [unpack_payload(reader.read(int(k)))[1] for k in keys]


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (DataLoader workers); Linux /proc."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _loop_rate(jpegs: list[bytes], repeats: int) -> tuple[float, float]:
    """(images per wall second, CPU seconds per image)."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(repeats):
        for data in jpegs:
            bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
            rgb = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)
            rgb.float().div_(255.0).sub_(0.5).div_(0.5)
    n = repeats * len(jpegs)
    return n / (time.perf_counter() - start), (_cpu_seconds() - cpu) / n


def _loader(root: Path, *, num_image: int, num_classes: int, workers: int):
    cfg = edict(
        rec=str(root),
        batch_size=128,
        num_classes=num_classes,
        num_image=num_image,
        seed=0,
        num_workers=workers,
        sampler=edict(type="pk", k=4),
    )
    loader = build_train_loader(cfg, rank=0, world_size=1)
    loader.batch_sampler.set_epoch(0)
    for _ in loader:  # warm-up: workers start, page cache fills
        pass
    return loader


def _loader_rate(loader, epoch: int) -> tuple[float, float]:
    """(images per wall second, CPU seconds per image over main process and workers)."""
    seen = 0
    start, cpu = time.perf_counter(), _cpu_seconds()
    loader.batch_sampler.set_epoch(epoch)
    for images, _ in loader:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start), (_cpu_seconds() - cpu) / seen


def _sampler_plan_seconds() -> float:
    rng = np.random.default_rng(0)
    counts = rng.integers(20, 91, 93_431)
    counts = np.round(counts * 5_179_510 / counts.sum()).astype(np.int64)
    labels = np.repeat(np.arange(counts.size), counts)
    sampler = PKBatchSampler(labels, batch_size=128, k=4, rank=3, world_size=8)
    start = time.perf_counter()
    n = sum(1 for _ in sampler)
    elapsed = time.perf_counter() - start
    assert n == len(sampler)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5, help="alternating rounds")
    parser.add_argument("--source", choices=("generated", "demo"), default="demo")
    parser.add_argument("--skip-sampler", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.source == "demo":
            from otface.data.demo import ensure_demo

            root = Path(ensure_demo())
        else:
            root = _generated_rec(Path(tmp) / "rec", args.images, per_identity=16)
        info = dataset_info(root)
        jpegs = _jpeg_bytes(root)
        _loop_rate(jpegs[:256], 1)  # warm-up
        loader = _loader(
            root,
            num_image=info.num_image // 128 * 128,
            num_classes=info.num_classes,
            workers=args.workers,
        )
        # Alternate the two so that both see the same machine load; report medians.
        loops, loads = [], []
        for epoch in range(1, args.epochs + 1):
            loops.append(_loop_rate(jpegs, 1))
            loads.append(_loader_rate(loader, epoch))
        loop, loop_cpu = np.median(np.asarray(loops), axis=0)
        load, load_cpu = np.median(np.asarray(loads), axis=0)
        del loader
    print(f"device: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}")
    print(f"data: {args.source}, {info.num_image} images, {info.num_classes} identities")
    print(f"{'path':<34}{'images/s':>12}{'CPU µs/image':>16}")
    print(f"{'plain decode loop (1 process)':<34}{loop:>12.0f}{loop_cpu * 1e6:>16.0f}")
    name = f"rec DataLoader ({args.workers} workers, P×K)"
    print(f"{name:<34}{load:>12.0f}{load_cpu * 1e6:>16.0f}")
    print(f"ratio loader / loop: {load / loop:.2f} (target >= 0.8; median of {args.epochs} rounds)")
    print(
        f"CPU per image, loop / loader: {loop_cpu / load_cpu:.2f} (how much work the loader "
        "adds, independent of how many cores are free)"
    )
    if not args.skip_sampler:
        print(f"P×K plan of one MS1MV3-sized epoch (rank 3 of 8): {_sampler_plan_seconds():.2f} s")


if __name__ == "__main__":
    main()
