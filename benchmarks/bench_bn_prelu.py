"""The fused BatchNorm2d + PReLU kernels against eager ``prelu(bn(x))``, per shape and per step.

Part 1, per shape: forward + backward (gradients of x, bn.weight, bn.bias, prelu.weight) of the
BatchNorm + PReLU of an IResNet block in training mode at batch ``--batch-size``: the stage
shapes 64x56x56, 128x28x28, 256x14x14, 512x7x7 and the stem's 64x112x112 (the largest). As
under CUDA autocast: float16 channels_last activation, float32 parameters; eager runs under
``torch.autocast`` (cuDNN BatchNorm, PReLU), the fused op (``kernel="triton"``) does not need
it. Each row gives the time per call of both (median over blocks), the paired ratio fused /
eager (median [IQR] over rounds), the fused op's bandwidth counting its eight passes over an
activation-sized tensor (forward: x twice and y; backward: x and dy twice each, and dx), and
the largest error of its output and four gradients relative to eager's, in the same run.

Part 2, per network (``--networks``): one forward + backward of the backbone alone
(``fp16=True``, channels_last, a fixed random batch, loss ``sum(w * emb)`` for a fixed random
``w``, the embedding BatchNorm1d in eval mode), with
``set_fused_bn_prelu(model, "off")`` against ``"auto"`` on the same model; also the number of
fused calls per step, peak memory of a step, and the largest gradient difference.

Both parts time the two contenders in short alternating blocks (ABAB..., the order flipped
each round) after warm-up, synchronising before and after each block, so a slow spell of the
device falls on both; ratios pair the blocks of one round. About 30-40 s on an H100/H200,
most of it compiling the kernels and the r100 steps.

    python benchmarks/bench_bn_prelu.py                        # CUDA: both parts
    python benchmarks/bench_bn_prelu.py --networks r100 --rounds 30
    python benchmarks/bench_bn_prelu.py --interpret            # CPU smoke run, tiny shapes

Without CUDA it says so and exits 0, unless ``--interpret``: then tiny float32 shapes and
``r18_lite`` run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``) — a check
that the script and the kernels run, whose times mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from _interleave import paired_ratios, spread
from torch import nn

from otface.backbones import bn_prelu, get_model, set_fused_bn_prelu
from otface.backbones import fused_bn_prelu as fbp

CL = torch.channels_last
STAGE_SHAPES = ((64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7))
INTERPRET_SHAPES = ((16, 8, 8), (64, 4, 4))
PASSES = 8  # activation-sized reads and writes of the fused forward + backward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(
    contenders: Dict[str, Tuple[Callable[[], None], Callable[[], None]]],
    *,
    rounds: int,
    block: int,
    warmup: int,
    device: torch.device,
) -> Dict[str, List[float]]:
    """Seconds per call of each contender, one mean per block, blocks alternating.

    Args:
        contenders: name -> ``(setup, call)``; ``setup`` runs untimed before each block.
        rounds: blocks per contender; the order of the contenders flips every round.
        block: calls per block.
        warmup: untimed calls of each contender first.
    """
    names = list(contenders)
    for name in names:
        setup, call = contenders[name]
        setup()
        for _ in range(warmup):
            call()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            setup, call = contenders[name]
            setup()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(block):
                call()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / block)
    return times


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _shape_row(shape, args, device, dtype) -> str:
    c = shape[1]
    gen = torch.Generator(device="cpu").manual_seed(c)
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype).contiguous(memory_format=CL)
    dy = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=CL)
    bn, prelu = nn.BatchNorm2d(c).to(device), nn.PReLU(c).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5), prelu.weight.uniform_(0, 0.5)
    params = (bn.weight, bn.bias, prelu.weight)
    x.requires_grad_(True)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda")

    def eager():
        with autocast:
            y = F.prelu(bn(x), prelu.weight)
        return (y,) + torch.autograd.grad(y, (x,) + params, dy)

    def fused():
        y = bn_prelu(x, bn, prelu, kernel="triton")
        return (y,) + torch.autograd.grad(y, (x,) + params, dy)

    errors = [_rel_error(a, b) for a, b in zip(fused(), eager())]
    names = ("y", "dx", "dgamma", "dbeta", "dalpha")
    worst = max(range(5), key=lambda i: errors[i])
    nothing = lambda: None  # noqa: E731
    times = interleave(
        {"eager": (nothing, eager), "fused": (nothing, fused)},
        rounds=args.rounds,
        block=args.block,
        warmup=args.warmup,
        device=device,
    )
    t_eager, t_fused = spread(times["eager"]).median, spread(times["fused"]).median
    r = spread(paired_ratios(times, "eager")["fused"])
    gbps = PASSES * x.numel() * x.element_size() / t_fused / 1e9
    label = "x".join(map(str, shape))
    return (
        f"{label:>16s} {t_eager * 1e3:9.3f} {t_fused * 1e3:9.3f} "
        f"{r.median:6.3f} [{r.q1:.3f}-{r.q3:.3f}] {gbps:8.0f} "
        f"{errors[worst]:9.1e} ({names[worst]})"
    )


def _network_rows(name: str, args, device) -> List[str]:
    torch.manual_seed(0)
    fp16 = device.type == "cuda"
    model = get_model(name, fp16=fp16).to(device).to(memory_format=CL).train()
    # The embedding BatchNorm1d in eval mode: in training mode it normalises each feature over
    # the batch, which leaves a loss of the embedding nearly flat in the backbone for a small
    # batch (the smoke run's), and the gradient check below meaningless.
    model.features.eval()
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(args.net_batch, 3, 112, 112, generator=gen).to(device)
    x = x.contiguous(memory_format=CL)
    w = torch.randn(args.net_batch, 512, generator=gen).to(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        (model(x).float() * w).sum().backward()

    def checked(kernel: str) -> Tuple[Dict[str, torch.Tensor], int, float]:
        set_fused_bn_prelu(model, kernel)
        step()  # compiles the kernels, autotunes cuDNN: not in the peak memory below
        model.load_state_dict(state)
        calls, real = [], fbp._BNPReLU.apply
        fbp._BNPReLU.apply = lambda *a: calls.append(1) or real(*a)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            step()
        finally:
            fbp._BNPReLU.apply = real
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        return grads, len(calls), peak

    state = copy.deepcopy(model.state_dict())
    grads_off, _, peak_off = checked("off")
    grads_on, n_calls, peak_on = checked(args.network_kernel)
    # Relative to the largest entry of any gradient: some (a BatchNorm bias feeding another
    # BatchNorm) are rounding noise around zero, where a per-tensor relative error means nothing.
    scale = max(g.abs().max().item() for g in grads_off.values())
    worst = max((grads_on[k] - g).abs().max().item() for k, g in grads_off.items()) / scale
    n_blocks = set_fused_bn_prelu(model, "off")
    times = interleave(
        {
            "off": (lambda: set_fused_bn_prelu(model, "off"), step),
            "fused": (lambda: set_fused_bn_prelu(model, args.network_kernel), step),
        },
        rounds=args.net_rounds,
        block=args.net_block,
        warmup=args.warmup_steps,
        device=device,
    )
    r = spread(paired_ratios(times, "off")["fused"])
    t_off, t_on = spread(times["off"]).median, spread(times["fused"]).median
    memory = f"peak memory GiB off {peak_off:.2f}, fused {peak_on:.2f}; " if fp16 else ""
    return [
        f"{name}: fused calls per step {n_calls} of {n_blocks} blocks; step ms off "
        f"{t_off * 1e3:.2f}, fused {t_on * 1e3:.2f}; ratio fused/off {r.median:.3f} "
        f"[{r.q1:.3f}-{r.q3:.3f}] over {r.n} rounds ({100 * (r.median - 1):+.1f}%)",
        f"{name}: {memory}largest gradient difference fused vs off {worst:.1e} (of the largest "
        f"gradient entry)",
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128, help="N of the per-shape part")
    parser.add_argument("--rounds", type=int, default=20, help="blocks per contender, per shape")
    parser.add_argument("--block", type=int, default=10, help="calls per block, per shape")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--networks", default="r50,r100", help="comma-separated, or empty")
    parser.add_argument("--net-batch", type=int, default=128)
    parser.add_argument("--net-rounds", type=int, default=8)
    parser.add_argument("--net-block", type=int, default=3, help="steps per block")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--network-kernel", default="auto", choices=fbp.KERNEL_CHOICES)
    parser.add_argument("--interpret", action="store_true", help="CPU smoke run, no CUDA")
    args = parser.parse_args(argv)

    if args.interpret:
        # Before the kernel module is first imported: triton.jit then interprets.
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
        dtype, shapes = torch.float32, INTERPRET_SHAPES
        args.batch_size, args.net_batch = 2, 2
        args.rounds = args.net_rounds = 2
        args.block = args.net_block = 1
        args.warmup = args.warmup_steps = 1
        args.network_kernel = "triton"
        networks = ["r18_lite"]
        where = f"CPU under TRITON_INTERPRET=1 (smoke run: times mean nothing), {dtype}"
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        dtype, shapes = torch.float16, STAGE_SHAPES
        networks = [n for n in args.networks.split(",") if n]
        where = f"{torch.cuda.get_device_name(device)}, float16 activations, float32 params"
    else:
        print("bench_bn_prelu: needs a CUDA device (--interpret runs a CPU smoke test)")
        return 0
    if not fbp.available():
        print("bench_bn_prelu: needs the triton package")
        return 0

    t_start = time.perf_counter()
    print(f"device: {where}; torch {torch.__version__}")
    print(
        f"per shape, batch {args.batch_size}, channels_last, training mode: ms per fwd+bwd "
        f"call (median of {args.rounds} blocks of {args.block}); ratio fused/eager median "
        f"[IQR] of paired blocks; fused GB/s over {PASSES} passes; largest relative error vs "
        f"eager"
    )
    print(
        f"{'N x C x H x W':>16s} {'eager ms':>9s} {'fused ms':>9s} {'ratio [IQR]':>20s} "
        f"{'GB/s':>8s} {'max err':>9s}"
    )
    for chw in shapes:
        print(_shape_row((args.batch_size,) + chw, args, device, dtype), flush=True)
    for name in networks:
        print(
            f"network {name}, batch {args.net_batch}, backbone fwd+bwd, {args.net_rounds} "
            f"rounds of {args.net_block}-step blocks, 'off' vs '{args.network_kernel}'"
        )
        for line in _network_rows(name, args, device):
            print(line, flush=True)
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
