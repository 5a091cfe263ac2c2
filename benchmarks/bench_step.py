"""One training step with the "arcface" and "otface" criteria side by side.

Same backbone initialisation, same batch (P identities x K images), same optimizer: forward,
backward and SGD step are timed (median after warm-up, synchronised on CUDA) for each
criterion, with the overhead ratio of OTFace, the number of hard triplets it mined, and peak
memory (CUDA allocator peak, or the process's resident set size on CPU).

    python benchmarks/bench_step.py                                    # CPU, r18_lite
    python benchmarks/bench_step.py --network r100 --batch-size 128 --fp16   # one GPU
    python benchmarks/bench_step.py --sync-debug      # host reads in one otface step, by source

``--sync-debug`` runs one ``otface`` step (forward, backward, optimiser step, grad scaler) under
a dispatch mode that records every op whose result the host must wait for (a scalar read such
as ``.item()``/``float()``/``bool()``, a data-dependent shape such as ``nonzero``/``unique``, a
device-to-host copy) with the line of this project's code that asked for it. On a GPU each is
a host sync; on a CPU the same list shows where they would be.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from otface.backbones import get_model, use_channels_last
from otface.registry import LOSSES

# configs/ is a folder of the repository, not of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Step:
    """Backbone, criterion, optimiser and fp16 scaler of one contender, and its step."""

    def __init__(self, loss_name: str, args, device: torch.device, state: dict, kernel: str):
        cfg = copy.deepcopy(importlib.import_module("configs.base").config)
        cfg.update(
            network=args.network, num_classes=args.num_classes, fp16=args.fp16, loss=loss_name
        )
        cfg.otface.kernel = kernel
        self.backbone = get_model(args.network, fp16=args.fp16, num_features=cfg.embedding_size)
        self.backbone.load_state_dict(state)
        self.backbone.to(device).train()
        self.channels_last = use_channels_last(args.channels_last, device)
        if self.channels_last:  # as the trainer does (config.channels_last)
            self.backbone.to(memory_format=torch.channels_last)
        self.criterion = LOSSES.build(
            loss_name, cfg, backbone=self.backbone, rank=0, world_size=1
        ).to(device)
        params = list(self.backbone.parameters()) + list(self.criterion.parameters())
        self.opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.scaler = torch.amp.GradScaler("cuda") if args.fp16 and device.type == "cuda" else None

    def batches(self, args, device: torch.device, count: int):
        # A fresh batch each step (the same sequence for every contender): reusing one batch
        # lets the model fit it within a few steps and leaves nothing hard to mine.
        g = torch.Generator().manual_seed(0)
        per = args.batch_size // args.k
        out = []
        for _ in range(count):
            x = torch.randn(args.batch_size, 3, 112, 112, generator=g).to(device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ids = torch.randperm(args.num_classes, generator=g)[:per].repeat_interleave(args.k)
            out.append((x, ids.to(device)))
        return out

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, step: int):
        out = self.criterion(self.backbone(x), labels, step=step)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(out.loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            out.loss.backward()
            self.opt.step()
        return out


def bench(loss_name: str, args, device: torch.device, state: dict, kernel: str = "auto"):
    run = _Step(loss_name, args, device, state, kernel)
    batches = run.batches(args, device, args.warmup + args.steps)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, n_hard = [], []
    for step, (x, labels) in enumerate(batches, start=1):
        _sync(device)
        t0 = time.perf_counter()
        out = run(x, labels, step)
        _sync(device)
        if step > args.warmup:
            times.append(time.perf_counter() - t0)
        if "n_hard" in out.metrics:
            n_hard.append(int(out.metrics["n_hard"].item()))
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        mem = _rss_mib()
    if hasattr(run.criterion, "remove_hook"):
        run.criterion.remove_hook()
    return statistics.median(times), (statistics.mean(n_hard) if n_hard else None), mem


_SYNCING_OPS = (
    "_local_scalar_dense",  # .item(), float(), bool(), .tolist()
    "nonzero",
    "_unique",
    "unique",
    "masked_select",
    "repeat_interleave",
)


def sync_report(args, device: torch.device, state: dict) -> list[tuple[str, str]]:
    """``(op, where)`` for every host-syncing op of one ``otface`` step (after a warm-up step)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    root = str(Path(__file__).resolve().parents[1])
    found: list[tuple[str, str]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
            name = func.__name__
            to_host = name in ("_to_copy", "copy_") and _leaves_device(func, args_, kwargs)
            if name.startswith(_SYNCING_OPS) or to_host:
                frames = [
                    f"{Path(f.filename).relative_to(root)}:{f.lineno}"
                    for f in traceback.extract_stack()
                    if f.filename.startswith(root)
                    and "site-packages" not in f.filename
                    and "bench_step" not in f.filename
                ]
                found.append((name, frames[-1] if frames else "(torch internals)"))
            return func(*args_, **(kwargs or {}))

    run = _Step("otface", args, device, state, "auto")
    for step, (x, labels) in enumerate(run.batches(args, device, 2), start=1):
        with Record() if step == 2 else contextlib.nullcontext():
            run(x, labels, step)
    return found


def _leaves_device(func, args, kwargs) -> bool:
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if func.__name__ == "copy_":
        dst, src = args[0], args[1] if len(args) > 1 else None
        return isinstance(src, torch.Tensor) and src.is_cuda and not dst.is_cuda
    target = (kwargs or {}).get("device")
    return src is not None and src.is_cuda and target is not None and target.type == "cpu"


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
    parser.add_argument(
        "--sync-debug", action="store_true", help="list the host syncs of one otface step"
    )
    parser.add_argument(
        "--channels-last",
        default="auto",
        type=lambda v: {"true": True, "false": False}.get(v.lower(), v),
        help="auto (on for CUDA, as the trainer), true or false",
    )
    parser.add_argument(
        "--ot-kernels",
        default="auto",
        help="comma-separated Sinkhorn kernels for the otface rows: auto, torch, matmul, triton",
    )
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
    if args.sync_debug:
        found = sync_report(args, device, state)
        print(f"host syncs in one otface step: {len(found)}")
        for (op, where), count in collections.Counter(found).most_common():
            print(f"  {count:3d} x {op:22s} {where}")
        return
    mem_label = "peak MiB (CUDA)" if device.type == "cuda" else "RSS MiB"
    print(f"{'criterion':16s} {'step ms':>9s} {'ratio':>7s} {'n_hard':>7s} {mem_label:>16s}")
    rows = [("arcface", *bench("arcface", args, device, state))]
    notes = []
    for kernel in args.ot_kernels.split(","):
        label = "otface" if kernel == "auto" else f"otface[{kernel}]"
        if kernel == "triton" and device.type != "cuda":
            notes.append(f"{label}: not timed, the Triton kernel needs CUDA")
            continue
        rows.append((label, *bench("otface", args, device, state, kernel=kernel)))
    base = rows[0][1]
    for crit, secs, n_hard, mem in rows:
        hard = "-" if n_hard is None else f"{n_hard:.1f}"
        print(f"{crit:16s} {secs * 1e3:9.1f} {secs / base:7.3f} {hard:>7s} {mem:16.0f}")
    for crit, secs, _, _ in rows[1:]:
        print(f"{crit} overhead: {100 * (secs / base - 1):+.1f}% of the arcface step")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
