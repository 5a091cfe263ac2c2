"""Where one training step's time goes: our step (as ``bench_step.py``'s comparison with
arcface_torch runs it) under ``torch.profiler``, its device time summed by kind of kernel and
listed by kernel.

    python benchmarks/profile_step.py --device cuda --network r100 --batch-size 128 --fp16 \
        --num-classes 93431 --loss otface
    python benchmarks/profile_step.py ... --compile default     # the compiled step
    python benchmarks/profile_step.py ... --trace step.json     # + a Chrome trace
    python benchmarks/profile_step.py ... --arcface-torch PATH  # + upstream's step, by category

First the step is timed without the profiler (``wall``), then profiled. On CUDA the table sums
the kernels' device time; ``busy`` is that sum over the wall time of the same steps: well under
100% means the GPU waits for the host (launch overhead: CUDA graphs help), near 100% means the
kernels themselves must get faster (fusion, better convolution kernels). On the CPU it sums the
self time of the ATen ops instead, which says little about a GPU.

With ``--arcface-torch PATH`` arcface_torch's own step (as ``bench_step.py --arcface-torch``
builds it, NCHW as it ships) is profiled after ours on the same batches, and the categories are
compared side by side: which kinds of kernel our step still spends more on.
"""

from __future__ import annotations

import argparse
import collections
import re
import time
from typing import Iterable, NamedTuple, Sequence

import torch
from _step import Step, bench_config, make_batches
from _timing import add_step_arguments, open_device, open_upstream, sync
from bench_step import COMPILE_MODES

from otface.backbones import get_model
from otface.train.model import COMPILE_SCOPES

# (category, pattern over the kernel or op name), first match wins: our own Triton kernels
# before the generic names they contain, layout transposes before convolutions (cuDNN's
# "nchwToNhwcKernel"), convolutions before GEMMs (cuDNN's "..._implicit_gemm_...").
CATEGORIES: tuple[tuple[str, re.Pattern], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        ("sinkhorn (ours, Triton)", r"sinkhorn_kernel"),
        (
            "bn+prelu (ours, Triton)",
            r"^(stats_partial|stats_finalize|fwd_elementwise|bwd_reduce|bwd_elementwise)_kernel",
        ),
        ("inductor (Triton)", r"^triton_"),
        ("optimizer", r"multi_tensor_apply|foreach|fused_sgd|sgd_"),
        ("layout transpose", r"nchwToNhwc|nhwcToNchw|transpose|permute"),
        ("convolution", r"conv|fprop|dgrad|wgrad|implicit|winograd|cudnn"),
        ("batchnorm", r"batch_norm|batchnorm|welford|bn_"),
        ("prelu", r"prelu"),
        ("gemm", r"gemm|cutlass|cublas|matmul|addmm|\bmm\b|linear"),
        ("nccl", r"nccl"),
        ("reduction", r"reduce|sum|norm"),
        ("copy / fill", r"copy|memcpy|memset|fill|cat"),
        ("elementwise", r"elementwise|vectorized|unrolled|aten::"),
    )
)
OTHER = "other"


def categorize(name: str) -> str:
    """The category of a kernel (or, on the CPU, an ATen op) from its name."""
    for category, pattern in CATEGORIES:
        if pattern.search(name):
            return category
    return OTHER


class Entry(NamedTuple):
    """A kernel (or op) of the profile: its name, total microseconds and call count."""

    name: str
    us: float
    count: int


def kernel_entries(prof: torch.profiler.profile, device: torch.device) -> list[Entry]:
    """The kernels of a CUDA profile (their device time), or on the CPU the ATen ops (their
    self time, so that nested ops are not counted twice)."""
    out = []
    for avg in prof.key_averages():
        if device.type == "cuda":
            if avg.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(avg, "self_device_time_total", None)
            if us is None:  # torch < 2.4
                us = avg.self_cuda_time_total
        else:
            if not avg.key.startswith("aten::"):
                continue
            us = avg.self_cpu_time_total
        if us > 0:
            out.append(Entry(avg.key, float(us), int(avg.count)))
    return out


def by_category(entries: Iterable[Entry]) -> dict[str, tuple[float, int]]:
    """``{category: (microseconds, count)}``, largest first."""
    sums: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in entries:
        s = sums[categorize(e.name)]
        s[0] += e.us
        s[1] += e.count
    return dict(sorted(((k, (v[0], v[1])) for k, v in sums.items()), key=lambda kv: -kv[1][0]))


def report(entries: list[Entry], *, steps: int, wall_ms: float, device: torch.device, top: int):
    """Print the category table, then the ``top`` kernels."""
    total_us = sum(e.us for e in entries)
    what = "GPU kernels" if device.type == "cuda" else "ATen ops (self CPU time)"
    per_step = total_us / 1e3 / steps
    launches = sum(e.count for e in entries) / steps
    print(
        f"wall per step (unprofiled): {wall_ms:.1f} ms; {what} per step: {per_step:.1f} ms "
        f"(busy {100 * per_step / wall_ms:.0f}% of the wall time); {launches:.0f} per step"
    )
    print(f"{'category':26s} {'ms/step':>9s} {'share':>7s} {'calls/step':>11s}")
    for category, (us, count) in by_category(entries).items():
        print(
            f"{category:26s} {us / 1e3 / steps:9.2f} {100 * us / total_us:6.1f}% "
            f"{count / steps:11.1f}"
        )
    print(f"top {top} by time:")
    print(f"{'ms/step':>9s} {'share':>7s} {'calls/step':>11s}  {'category':26s} name")
    for e in sorted(entries, key=lambda e: -e.us)[:top]:
        name = e.name if len(e.name) <= 110 else e.name[:107] + "..."
        print(
            f"{e.us / 1e3 / steps:9.3f} {100 * e.us / total_us:6.1f}% {e.count / steps:11.1f}  "
            f"{categorize(e.name):26s} {name}"
        )


def compare(ours: list[Entry], theirs: list[Entry], *, steps: int) -> None:
    """Print the categories of two profiles side by side, in ms per step."""
    a, b = by_category(ours), by_category(theirs)
    names = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, (0, 0))[0], b.get(k, (0, 0))[0]))
    print(f"{'category':26s} {'ours ms':>9s} {'upstream ms':>12s} {'ours - upstream':>16s}")
    for name in names:
        mine, up = a.get(name, (0.0, 0))[0] / 1e3 / steps, b.get(name, (0.0, 0))[0] / 1e3 / steps
        print(f"{name:26s} {mine:9.2f} {up:12.2f} {mine - up:+16.2f}")
    total_a = sum(e.us for e in ours) / 1e3 / steps
    total_b = sum(e.us for e in theirs) / 1e3 / steps
    print(f"{'all':26s} {total_a:9.2f} {total_b:12.2f} {total_a - total_b:+16.2f}")


def profile(run, batches, *, warmup: int, steps: int, device: torch.device):
    """Run ``warmup`` steps, time ``steps`` more, then profile ``steps`` more. Returns the
    profiler and the unprofiled wall time per step in ms. ``batches`` holds
    ``warmup + 2 * steps`` of them."""
    done = 0

    def run_steps(count: int) -> None:
        nonlocal done
        for _ in range(count):
            x, labels = batches[done]
            done += 1
            run(x, labels, done)

    run_steps(warmup)
    sync(device)
    t0 = time.perf_counter()
    run_steps(steps)
    sync(device)
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run_steps(steps)
        sync(device)
    return prof, wall_ms


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_arguments(parser, batch_size=32, loss="arcface")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch default)")
    parser.add_argument(
        "--channels-last",
        default="auto",
        type=lambda v: {"true": True, "false": False}.get(v.lower(), v),
        help="auto (on for CUDA, as the trainer), true or false",
    )
    parser.add_argument("--compile", choices=COMPILE_MODES, help="config.compile's mode")
    parser.add_argument("--compile-scope", choices=COMPILE_SCOPES, default="blocks")
    parser.add_argument("--fused-bn-prelu", action="store_true")
    parser.add_argument("--top", type=int, default=25, help="kernels listed")
    parser.add_argument("--trace", metavar="FILE", help="also write a Chrome trace of ours")
    parser.add_argument(
        "--arcface-torch", metavar="PATH", help="an arcface_torch checkout: profile its step too"
    )
    args = parser.parse_args(argv)
    upstream = open_upstream(parser, args.arcface_torch)
    device, name = open_device(args.device, args.threads)
    torch.manual_seed(0)
    state = get_model(args.network, num_features=512).state_dict()
    run = Step(
        args.loss,
        args,
        device,
        state,
        "auto",
        as_trainer=True,
        compile_mode=args.compile,
        fused_bn_prelu=args.fused_bn_prelu,
        compile_scope=args.compile_scope,
    )
    count = args.warmup + 2 * args.steps
    print(
        f"device: {name}; {args.network} {args.loss}, batch {args.batch_size}, fp16={args.fp16}, "
        f"classes {args.num_classes}, channels_last={run.channels_last}, "
        f"compile={args.compile or False}"
        + (f" ({args.compile_scope})" if args.compile else "")
        + f", fused_bn_prelu={args.fused_bn_prelu}; {args.steps} steps after {args.warmup}"
    )
    prof, wall_ms = profile(
        run, run.batches(args, device, count), warmup=args.warmup, steps=args.steps, device=device
    )
    if hasattr(run.criterion, "remove_hook"):
        run.criterion.remove_hook()
    ours = kernel_entries(prof, device)
    report(ours, steps=args.steps, wall_ms=wall_ms, device=device, top=args.top)
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace: {args.trace}")
    if upstream is not None:
        from _upstream import UpstreamStep, single_process_group

        centres = run.criterion.partial_fc.weight.detach()
        with single_process_group(device):
            theirs = UpstreamStep(upstream, bench_config(args), device, state, centres)
            batches = make_batches(args, device, count, channels_last=False)
            prof, wall_up = profile(
                theirs, batches, warmup=args.warmup, steps=args.steps, device=device
            )
        print(
            f"\nupstream arcface_torch from {upstream.root} ({theirs.note}): wall per step "
            f"{wall_up:.1f} ms; ours / upstream {wall_ms / wall_up:.3f} (one measurement each, "
            "not interleaved: bench_step.py --arcface-torch gives the ratio)"
        )
        compare(ours, kernel_entries(prof, device), steps=args.steps)


if __name__ == "__main__":
    main()
