"""One training step with the "arcface" and "otface" criteria side by side.

Same backbone initialisation, same batch (P identities x K images), same optimizer: forward,
backward and SGD step are timed (median after warm-up, synchronised on CUDA) for each
criterion, with the overhead ratio of OTFace, the number of hard triplets it mined, and peak
memory (CUDA allocator peak, or the process's resident set size on CPU).

    python benchmarks/bench_step.py                                    # CPU, r18_lite
    python benchmarks/bench_step.py --network r100 --batch-size 128 --fp16   # one GPU
    python benchmarks/bench_step.py --sync-debug      # host reads in one otface step, by source
    python benchmarks/bench_step.py --compile default,reduce-overhead   # + compiled rows
    python benchmarks/bench_step.py --compile default --compile-scope blocks,network
    python benchmarks/bench_step.py --fused-bn-prelu   # + rows with the fused BN + PReLU (CUDA)
    python benchmarks/bench_step.py --cuda-graph       # + rows with the step as a CUDA graph
    python benchmarks/bench_step.py --head adaface,curricularface   # + rows with other heads

``--head HEAD[,HEAD]`` adds our eager rows again with Partial FC's margin head set as
``config.head`` does (``name+adaface``, ``name+curricularface``); each is also compared with the
same row on the combined head. With ``--sync-debug`` the host syncs are listed for each head.
``--interleave`` times our rows in interleaved blocks, as ``--arcface-torch`` below, each block
over the ``arcface`` row's block of the same round: on a machine shared with other jobs the
paired ratios are steadier than one run per row.

    python benchmarks/bench_step.py --network r18 --batch-size 64 --head adaface,curricularface \
        --interleave --warmup 1 --blocks 3 --block-steps 2

``--cuda-graph`` adds our rows again with the forward and backward recorded once as a CUDA
graph and replayed (``name+graph``, as ``config.cuda_graph``: :mod:`otface.train.graph`); the
optimiser step stays eager. The recording happens after 3 eager steps, within the warm-up:
give ``--warmup`` 4 or more.

``--compile MODE[,MODE]`` adds, for each mode, our rows again with the backbone compiled as
``config.compile`` does (in place, before the feature hook is registered), labelled
``arcface+MODE`` and so on; the ``first s`` column gives each row's first step, which holds the
compilation. ``--compile-scope`` says what is compiled, as ``config.compile_scope``: ``blocks``
(the default: the stem and each residual block, identical blocks sharing one graph) or
``network`` (one graph, rows labelled ``+MODE/network``), or both. With ``--arcface-torch``
the compiled rows join the interleaved blocks.

``--sync-debug`` runs one ``otface`` step (forward, backward, optimiser step, grad scaler) under
a dispatch mode that records every op whose result the host must wait for (a scalar read such
as ``.item()``/``float()``/``bool()``, a data-dependent shape such as ``nonzero``/``unique``, a
device-to-host copy) with the line of this project's code that asked for it. On a GPU each is
a host sync; on a CPU the same list shows where they would be.

``--arcface-torch PATH`` times arcface_torch's own step, imported at run time from the checkout
at PATH (its ``backbones``, ``losses.CombinedMarginLoss`` and ``partial_fc_v2.PartialFC_V2``;
nothing of it is copied here), beside ours ("arcface", "otface" and any ``--ot-kernels``), on
the same batches, from the same backbone weights and class centres, with the same margins and
SGD settings; each side clips and steps as its trainer does (``_upstream.py`` lists what is left
out). A GPU's speed drifts by tens of percent between runs and within one, so one long run per
contender can rank them wrongly: the contenders run in short blocks (``--block-steps``),
interleaved in an order rotated every round (ABC, BCA, CAB, ...) for ``--blocks`` rounds. Each
block gives a median step time; each of ours is divided by arcface_torch's block of the same
round, and the table shows the median and spread of those paired ratios.

    python benchmarks/bench_step.py --arcface-torch ../insightface/recognition/arcface_torch \
        --network r100 --batch-size 128 --fp16 --num-classes 93431 --warmup 5 --blocks 20

The Vision Transformers (``--network vit_t``, ``vit_s``, ``vit_b``, ...) compare the same way,
from the same weights (the layouts are interchangeable), both in training mode with their
stochastic depth and token masking; our ``otface`` row hooks the final patch tokens and gives
the masked ones no mass. arcface_torch's ViT imports three helpers from timm: without timm,
``_upstream.py`` supplies a stand-in for them. On CUDA, upstream's ViT runs its linear layers
under float16 autocast whatever the config says and ours only with ``--fp16``: give ``--fp16``
to compare like with like (a note says so otherwise).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import torch
from _interleave import Interleaved, interleave, paired_ratios, spread
from _interleave import Spread as Spread  # re-exported for the tests
from _step import Step, bench_config, make_batches
from _timing import add_step_arguments, open_device, open_upstream, sync

from otface.backbones import get_model
from otface.evaluation.cli import positive_int
from otface.heads import HEADS
from otface.train.model import COMPILE_SCOPES

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _comma_list(valid: Sequence[str], what: str):
    """An argparse type: a comma-separated, non-empty list of ``valid`` names."""

    def parse(value: str) -> list[str]:
        names = [v for v in value.split(",") if v]
        bad = [v for v in names if v not in valid] or ([] if names else [value])
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {bad[0]!r}; valid: {', '.join(valid)}"
            )
        return names

    return parse


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Contender(NamedTuple):
    """One of our rows: its label, criterion, Sinkhorn kernel, ``torch.compile`` mode, whether
    its IResNet blocks run the fused BatchNorm + PReLU, what is compiled, whether the step
    is a CUDA graph, and Partial FC's margin head."""

    label: str
    loss_name: str
    kernel: str
    compile_mode: str | None = None
    fused_bn_prelu: bool = False
    compile_scope: str = "blocks"
    cuda_graph: bool = False
    head: str = "combined"


def contenders(args, device: torch.device) -> tuple[list[Contender], list[str]]:
    """Our rows for ``args``: ``arcface``, ``otface`` for each ``--ot-kernels`` entry, the same
    again compiled in each ``--compile`` mode and ``--compile-scope`` (labelled ``name+mode``,
    or ``name+mode/network`` for the whole-network scope) and, with
    ``--fused-bn-prelu``, with the fused BatchNorm + PReLU (``name+fused``) and, with
    ``--cuda-graph``, with the step recorded as a CUDA graph (``name+graph``). Also the notes on
    rows that cannot run on ``device``."""
    rows, notes = [Contender("arcface", "arcface", "auto")], []
    for kernel in args.ot_kernels.split(","):
        label = "otface" if kernel == "auto" else f"otface[{kernel}]"
        if kernel == "triton" and device.type != "cuda":
            notes.append(f"{label}: not timed, the Triton kernel needs CUDA")
            continue
        rows.append(Contender(label, "otface", kernel))
    eager = list(rows)
    for head in args.head:
        if head != "combined":
            rows += [c._replace(label=f"{c.label}+{head}", head=head) for c in eager]
    for mode in args.compile:
        for scope in args.compile_scope:
            tag = mode if scope == "blocks" else f"{mode}/{scope}"
            rows += [
                c._replace(label=f"{c.label}+{tag}", compile_mode=mode, compile_scope=scope)
                for c in eager
            ]
    if args.fused_bn_prelu:
        if device.type != "cuda":
            notes.append("+fused rows: not timed, the fused BatchNorm + PReLU needs CUDA")
        else:
            rows += [c._replace(label=f"{c.label}+fused", fused_bn_prelu=True) for c in eager]
    if args.cuda_graph:
        if device.type != "cuda":
            notes.append("+graph rows: not timed, CUDA graphs need CUDA")
        else:
            rows += [c._replace(label=f"{c.label}+graph", cuda_graph=True) for c in eager]
    return rows, notes


def bench(
    loss_name: str,
    args,
    device: torch.device,
    state: dict,
    kernel: str = "auto",
    compile_mode: str | None = None,
    fused_bn_prelu: bool = False,
    compile_scope: str = "blocks",
    cuda_graph: bool = False,
    head: str = "combined",
):
    run = Step(
        loss_name,
        args,
        device,
        state,
        kernel,
        compile_mode=compile_mode,
        fused_bn_prelu=fused_bn_prelu,
        compile_scope=compile_scope,
        cuda_graph=cuda_graph,
        head=head,
    )
    batches = run.batches(args, device, args.warmup + args.steps)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, n_hard, first_s = [], [], None
    for step, (x, labels) in enumerate(batches, start=1):
        sync(device)
        t0 = time.perf_counter()
        out = run(x, labels, step)
        sync(device)
        if step == 1:
            first_s = time.perf_counter() - t0
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
    hard = statistics.mean(n_hard) if n_hard else None
    return statistics.median(times), hard, mem, first_s


def compare_interleaved(args, device: torch.device, state: dict, mods=None) -> None:
    """Time our rows in interleaved blocks and print the step times and paired ratios: over
    arcface_torch's step (``mods``: ``_upstream.load_arcface_torch``), or without it over our
    ``arcface`` row (``--interleave``, e.g. the heads against the combined one)."""
    from _upstream import UpstreamStep, single_process_group

    count = args.warmup + args.blocks * args.block_steps
    rows, notes = contenders(args, device)
    for note in notes:
        print(note)
    anchor = "upstream" if mods is not None else "arcface"
    with single_process_group(device) if mods is not None else contextlib.nullcontext():
        ours = {
            c.label: Step(
                c.loss_name,
                args,
                device,
                state,
                c.kernel,
                as_trainer=True,
                compile_mode=c.compile_mode,
                fused_bn_prelu=c.fused_bn_prelu,
                compile_scope=c.compile_scope,
                cuda_graph=c.cuda_graph,
                head=c.head,
            )
            for c in rows
        }
        runs = dict(ours)
        if mods is not None:
            centres = ours["arcface"].criterion.partial_fc.weight.detach()
            upstream = UpstreamStep(mods, bench_config(args), device, state, centres)
            print(f"upstream: arcface_torch from {mods.root}; {upstream.note}, same class centres")
            if args.network.startswith("vit") and device.type == "cuda" and not args.fp16:
                print(
                    "note: upstream's ViT runs under float16 autocast on CUDA whatever --fp16 "
                    "says, ours in float32 without --fp16: the rows are not like for like"
                )
            runs = {"upstream": upstream, **ours}
        layouts = {name: run.channels_last for name, run in runs.items()}
        nchw = make_batches(args, device, count, channels_last=False)
        batches = {False: nchw}
        if any(layouts.values()):
            batches[True] = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in nchw]
        result = interleave(
            {name: (run, batches[layouts[name]]) for name, run in runs.items()}, args, device
        )
        for run in ours.values():
            if hasattr(run.criterion, "remove_hook"):
                run.criterion.remove_hook()
    _print_comparison(result, layouts, anchor)
    for c in rows:
        if c.head != "combined":  # each head over the same row on the combined head
            same = c.label[: -len(c.head) - 1]
            r = spread([a / b for a, b in zip(result.block_s[c.label], result.block_s[same])])
            print(
                f"{c.label} vs {same} (combined head): {r.median:.3f} [{r.q1:.3f}-{r.q3:.3f}] "
                f"({r.lo:.3f}-{r.hi:.3f}), median [IQR] (min-max) of {r.n} paired blocks"
            )
    for label, run in ours.items():
        if run.graph is not None and not run.graph.replaying:
            print(f"{label}: the CUDA graph was not recorded ({run.graph.failed}); timed eagerly")


def _print_comparison(result: Interleaved, layouts: Mapping[str, bool], anchor: str) -> None:
    ratios = paired_ratios(result.block_s, anchor)
    n_blocks = len(result.block_s[anchor])
    print(
        f"step ms: median step of each block, median [IQR] (min-max) over {n_blocks} blocks; "
        f"ratio: each block over {anchor}'s block of the same round, median [IQR] (min-max) "
        f"of the {n_blocks} pairs"
    )
    print(
        f"{'contender':26s} {'layout':6s} {'step ms':>34s}  {'ratio':>34s} {'n_hard':>7s} "
        f"{'first s':>8s}"
    )
    for name, times in result.block_s.items():
        t = spread([1e3 * v for v in times])
        step = f"{t.median:.1f} [{t.q1:.1f}-{t.q3:.1f}] ({t.lo:.1f}-{t.hi:.1f})"
        if name == anchor:
            ratio = "1 (anchor)"
        else:
            r = spread(ratios[name])
            ratio = f"{r.median:.3f} [{r.q1:.3f}-{r.q3:.3f}] ({r.lo:.3f}-{r.hi:.3f})"
        hard = result.n_hard[name]
        hard_s = f"{statistics.mean(hard):.1f}" if hard else "-"
        layout = "NHWC" if layouts[name] else "NCHW"
        first = result.first_s.get(name, float("nan"))
        print(f"{name:26s} {layout:6s} {step:>34s}  {ratio:>34s} {hard_s:>7s} {first:8.1f}")
    for name, values in ratios.items():
        print(f"{name} vs {anchor}: {100 * (spread(values).median - 1):+.1f}% (median of pairs)")
    print("first s: the first step of each contender (cuDNN autotuning; compilation with +MODE)")


_SYNCING_OPS = (
    "_local_scalar_dense",  # .item(), float(), bool(), .tolist()
    "nonzero",
    "_unique",
    "unique",
    "masked_select",
    "repeat_interleave",
)


def sync_report(
    args, device: torch.device, state: dict, head: str = "combined"
) -> list[tuple[str, str]]:
    """``(op, where)`` for every host-syncing op of one ``otface`` step (after a warm-up step)
    with Partial FC's margin ``head``."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    root = str(Path(__file__).resolve().parents[1])
    scripts = str(Path(__file__).resolve().parent)  # this benchmark's own frames say nothing
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
                    and not f.filename.startswith(scripts)
                ]
                found.append((name, frames[-1] if frames else "(torch internals)"))
            return func(*args_, **(kwargs or {}))

    run = Step("otface", args, device, state, "auto", head=head)
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_arguments(parser, batch_size=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
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
    parser.add_argument(
        "--compile",
        type=_comma_list(COMPILE_MODES, "compile mode"),
        default=[],
        metavar="MODE[,MODE]",
        help="also time our rows with the backbone torch.compile'd in these modes "
        f"({', '.join(COMPILE_MODES)}), as config.compile does",
    )
    parser.add_argument(
        "--compile-scope",
        type=_comma_list(COMPILE_SCOPES, "compile scope"),
        default=["blocks"],
        metavar="SCOPE[,SCOPE]",
        help="with --compile: what is compiled, as config.compile_scope: blocks (default), "
        "network, or both (rows +MODE and +MODE/network)",
    )
    parser.add_argument(
        "--fused-bn-prelu",
        action="store_true",
        help="also time our rows with IResNet's BatchNorm + PReLU fused (config.fused_bn_prelu)",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="also time our rows with the forward and backward recorded as one CUDA graph "
        "(config.cuda_graph)",
    )
    parser.add_argument(
        "--head",
        type=_comma_list(HEADS, "head"),
        default=["combined"],
        metavar="HEAD[,HEAD]",
        help=f"also time our rows with these margin heads ({', '.join(HEADS)}), as config.head "
        "does; the combined head's rows are always timed",
    )
    parser.add_argument(
        "--arcface-torch",
        metavar="PATH",
        help="an arcface_torch checkout: time its own step beside ours, interleaved",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time our rows in interleaved blocks as --arcface-torch does, each over our "
        "arcface row of the same round (a fairer comparison on a busy machine)",
    )
    parser.add_argument(
        "--blocks",
        type=positive_int,
        default=10,
        help="with --arcface-torch or --interleave: rounds of blocks",
    )
    parser.add_argument(
        "--block-steps",
        type=positive_int,
        default=5,
        help="with --arcface-torch or --interleave: steps per contender in each block",
    )
    args = parser.parse_args(argv)
    if (args.arcface_torch or args.interleave) and args.sync_debug:
        parser.error("--sync-debug and --arcface-torch / --interleave are separate runs; give one")
    upstream = open_upstream(parser, args.arcface_torch)
    device, name = open_device(args.device, args.threads)
    torch.manual_seed(0)
    state = get_model(args.network, num_features=512).state_dict()
    print(
        f"device: {name}; network {args.network}, batch {args.batch_size} "
        f"({args.batch_size // args.k} ids x {args.k}), fp16={args.fp16}, "
        f"classes {args.num_classes}; "
        + (
            f"{args.blocks} rounds of {args.block_steps}-step blocks per contender in rotating "
            f"order, after {args.warmup} warm-up steps each"
            if args.arcface_torch or args.interleave
            else f"median of {args.steps} steps after {args.warmup}"
        )
    )
    if args.arcface_torch or args.interleave:
        compare_interleaved(args, device, state, upstream)
        return
    if args.sync_debug:
        for head in dict.fromkeys(["combined", *args.head]):
            found = sync_report(args, device, state, head)
            print(f"host syncs in one otface step, head {head}: {len(found)}")
            for (op, where), count in collections.Counter(found).most_common():
                print(f"  {count:3d} x {op:22s} {where}")
        return
    mem_label = "peak MiB (CUDA)" if device.type == "cuda" else "RSS MiB"
    print(
        f"{'criterion':26s} {'step ms':>9s} {'ratio':>7s} {'n_hard':>7s} {mem_label:>16s} "
        f"{'first s':>8s}"
    )
    specs, notes = contenders(args, device)
    rows = []
    for c in specs:
        rows.append((c.label, *bench(c.loss_name, args, device, state, *c[2:])))
    base = rows[0][1]
    for crit, secs, n_hard, mem, first in rows:
        hard = "-" if n_hard is None else f"{n_hard:.1f}"
        print(
            f"{crit:26s} {secs * 1e3:9.1f} {secs / base:7.3f} {hard:>7s} {mem:16.0f} {first:8.1f}"
        )
    for crit, secs, *_ in rows[1:]:
        print(f"{crit} overhead: {100 * (secs / base - 1):+.1f}% of the arcface step")
    by_label = {crit: secs for crit, secs, *_ in rows}
    for c in specs:
        if c.head != "combined":
            same = by_label[c.label[: -len(c.head) - 1]]
            ratio = by_label[c.label] / same
            print(f"{c.label} vs the combined head: {ratio:.3f} ({100 * (ratio - 1):+.1f}%)")
    print("first s: the first step (cuDNN autotuning; compilation for +MODE rows)")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
