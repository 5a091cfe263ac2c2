"""The training loop's throughput against the bare step's, in one process, interleaved.

The same :class:`otface.train.loop.Trainer` runs, in alternating blocks:

* ``step``: ``train_step`` on a few batches already on the device (the ``bench_step`` setting:
  no data loading, no logging);
* ``loop``: what ``train.py`` does per batch: the DataLoader (workers, pinned memory), the
  device prefetcher, ``train_step`` and the step logger (a log line every ``--frequent`` steps).

Each loop block first takes as many batches as the loader can have queued during the step
block before it (``num_workers * prefetch_factor``, untimed), so it is timed in steady state.
The result is the median over the pairs of blocks of ``loop / step`` throughput, with its
range; the target is >= 0.95.

    python benchmarks/bench_loop.py --network r50 --batch-size 128 --fp16 --num-workers 8
    python benchmarks/bench_loop.py            # CPU smoke run: r18_lite, batch 16, 2 workers
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch
from _timing import add_step_arguments, base_config, sync

from otface.config import validate_config
from otface.train.data import build_loader, prepare_data
from otface.train.distributed import DistEnv
from otface.train.log import StepLogger
from otface.train.loop import Trainer
from otface.train.prefetch import DevicePrefetcher, to_training_layout

PREFETCH_FACTOR = 2  # torch's DataLoader default


def _steps_needed(args) -> int:
    drain = max(args.num_workers, 1) * PREFETCH_FACTOR
    return 4 + 2 * (1 + args.warmup) + args.blocks * (2 * args.block_steps + drain) + 10


def _config(args, output: str):
    cfg = base_config()
    cfg.update(
        network=args.network,
        loss=args.loss,
        fp16=args.fp16,
        rec="synthetic",
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        # One epoch longer than the benchmark, with sampler.k images per identity; no more
        # (the sampler and the labels are built for the whole epoch at start-up).
        num_image=max(args.k * args.num_classes, args.batch_size * _steps_needed(args)),
        num_workers=args.num_workers,
        frequent=args.frequent,
        val_targets=[],
        output=output,
        compile=args.compile,
        cuda_graph=args.cuda_graph,
    )
    cfg.sampler.update(type="pk", k=args.k)
    validate_config(cfg)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_arguments(parser, batch_size=16, loss="otface")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--frequent", type=int, default=10, help="a log line every N steps")
    parser.add_argument("--blocks", type=int, default=3, help="pairs of (step, loop) blocks")
    parser.add_argument("--block-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--compile",
        default=False,
        type=lambda v: {"true": True, "false": False}.get(v.lower(), v),
        help="config.compile: false (default), true, default, reduce-overhead, max-autotune",
    )
    parser.add_argument(
        "--cuda-graph",
        default="off",
        choices=("off", "auto", "on"),
        help="config.cuda_graph: the step's forward and backward as one CUDA graph",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
        torch.backends.cudnn.benchmark = True
    logging.basicConfig(level=logging.WARNING)  # the step logger's lines are not the output

    with tempfile.TemporaryDirectory() as output:
        cfg = _config(args, output)
        env = DistEnv(rank=0, local_rank=0, world_size=1, device=device)
        loader = build_loader(cfg, env, prepare_data(cfg))
        loader.batch_sampler.set_epoch(0, start_batch=0)
        trainer = Trainer(cfg, env)
        trainer.backbone.train()
        logger = StepLogger(
            frequent=cfg.frequent, total_step=10**9, batch_size=cfg.batch_size, world_size=1
        )
        batches = iter(DevicePrefetcher(loader, device, channels_last=trainer.channels_last))
        cached = [
            to_training_layout(img, lab, device, channels_last=trainer.channels_last)
            for img, lab in (next(batches) for _ in range(4))
        ]

        def loop_steps(count: int) -> None:
            for _ in range(count):
                img, labels = next(batches)
                out = trainer.train_step(img, labels)
                step = trainer.global_step
                scale = trainer.grad_scaler.get_scale() if trainer.grad_scaler else None
                logged = step % cfg.frequent == 0
                logger(
                    step,
                    out.metrics,
                    epoch=0,
                    lr=trainer.lr,
                    grad_scale=scale if logged else None,
                    counters={"skipped_steps": trainer.skipped_steps} if logged else None,
                )

        def step_steps(count: int) -> None:
            for i in range(count):
                trainer.train_step(*cached[i % len(cached)])

        def timed(fn, count: int) -> float:
            sync(device)
            t0 = time.perf_counter()
            fn(count)
            sync(device)
            return count * cfg.batch_size / (time.perf_counter() - t0)

        sync(device)
        t0 = time.perf_counter()
        loop_steps(1)  # with config.compile, the compilation happens here
        sync(device)
        first_step_s = time.perf_counter() - t0
        loop_steps(args.warmup)
        step_steps(args.warmup)
        drain = max(args.num_workers, 1) * PREFETCH_FACTOR
        step_rates, loop_rates = [], []
        for _ in range(args.blocks):
            step_rates.append(timed(step_steps, args.block_steps))
            loop_steps(drain)  # what the workers queued meanwhile: not the loop's own pace
            loop_rates.append(timed(loop_steps, args.block_steps))
        if trainer.criterion is not None and hasattr(trainer.criterion, "remove_hook"):
            trainer.criterion.remove_hook()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    graph = trainer.step_graph
    recorded = "no" if graph is None else ("yes" if graph.replaying else f"no ({graph.failed})")
    ratios = [lp / st for lp, st in zip(loop_rates, step_rates)]
    print(
        f"device: {name}; {args.network} {args.loss}, batch {args.batch_size}, "
        f"fp16={args.fp16}, classes {args.num_classes}, {args.num_workers} workers, "
        f"{args.blocks} pairs of {args.block_steps}-step blocks, compile={args.compile}, "
        f"cuda_graph={args.cuda_graph} (recorded: {recorded})"
    )
    print(f"first step (compilation included, if any): {first_step_s:.1f} s")
    print(f"{'mode':6s} {'img/s (median)':>15s} {'min':>9s} {'max':>9s}")
    for label, rates in (("step", step_rates), ("loop", loop_rates)):
        print(f"{label:6s} {statistics.median(rates):15.1f} {min(rates):9.1f} {max(rates):9.1f}")
    print(
        f"loop / step throughput: median {statistics.median(ratios):.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} paired blocks; "
        "target >= 0.95)"
    )


if __name__ == "__main__":
    main()
