"""One training step with the "arcface" and "otface" criteria side by side.

Same backbone initialisation, same batch (P identities x K images), same optimizer: forward,
backward and SGD step are timed (median after warm-up, synchronised on CUDA) for each
criterion, with the overhead ratio of OTFace, the number of hard triplets it mined, and peak
memory (CUDA allocator peak, or the process's resident set size on CPU).

    python benchmarks/bench_step.py                                    # CPU, r18_lite
    python benchmarks/bench_step.py --network r100 --batch-size 128 --fp16   # one GPU
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from otface.backbones import get_model
from otface.registry import LOSSES

# configs/ is a folder of the repository, not of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(loss_name: str, args, device: torch.device, state: dict):
    cfg = copy.deepcopy(importlib.import_module("configs.base").config)
    cfg.update(network=args.network, num_classes=args.num_classes, fp16=args.fp16, loss=loss_name)
    backbone = get_model(args.network, fp16=args.fp16, num_features=cfg.embedding_size)
    backbone.load_state_dict(state)
    backbone.to(device).train()
    criterion = LOSSES.build(loss_name, cfg, backbone=backbone, rank=0, world_size=1).to(device)
    params = list(backbone.parameters()) + list(criterion.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda") if args.fp16 and device.type == "cuda" else None

    # A fresh batch each step (the same sequence for both criteria): reusing one batch lets the
    # model fit it within a few steps and leaves nothing hard to mine.
    g = torch.Generator().manual_seed(0)
    per = args.batch_size // args.k
    batches = []
    for _ in range(args.warmup + args.steps):
        x = torch.randn(args.batch_size, 3, 112, 112, generator=g).to(device)
        ids = torch.randperm(args.num_classes, generator=g)[:per].repeat_interleave(args.k)
        batches.append((x, ids.to(device)))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, n_hard = [], []
    for step, (x, labels) in enumerate(batches, start=1):
        _sync(device)
        t0 = time.perf_counter()
        out = criterion(backbone(x), labels, step=step)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(out.loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            out.loss.backward()
            opt.step()
        _sync(device)
        if step > args.warmup:
            times.append(time.perf_counter() - t0)
        if "n_hard" in out.metrics:
            n_hard.append(int(out.metrics["n_hard"].item()))
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        mem = _rss_mib()
    if hasattr(criterion, "remove_hook"):
        criterion.remove_hook()
    return statistics.median(times), (statistics.mean(n_hard) if n_hard else None), mem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", default="r18_lite")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--k", type=int, default=4, help="images per identity in the batch")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        torch.backends.cudnn.benchmark = True
    else:
        name = f"CPU, {torch.get_num_threads()} thread(s)"
    torch.manual_seed(0)
    state = get_model(args.network, num_features=512).state_dict()
    print(
        f"device: {name}; network {args.network}, batch {args.batch_size} "
        f"({args.batch_size // args.k} ids x {args.k}), fp16={args.fp16}, "
        f"classes {args.num_classes}; median of {args.steps} steps after {args.warmup}"
    )
    mem_label = "peak MiB (CUDA)" if device.type == "cuda" else "RSS MiB"
    print(f"{'criterion':10s} {'step ms':>9s} {'ratio':>7s} {'n_hard':>7s} {mem_label:>16s}")
    rows = [(name_, *bench(name_, args, device, state)) for name_ in ("arcface", "otface")]
    base = rows[0][1]
    for crit, secs, n_hard, mem in rows:
        hard = "-" if n_hard is None else f"{n_hard:.1f}"
        print(f"{crit:10s} {secs * 1e3:9.1f} {secs / base:7.3f} {hard:>7s} {mem:16.0f}")
    print(f"OTFace overhead: {100 * (rows[1][1] / base - 1):+.1f}% of the arcface step")


if __name__ == "__main__":
    main()
