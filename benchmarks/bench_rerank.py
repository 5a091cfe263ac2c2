"""What OT re-ranking costs per probe, against stage 1 alone, in one run.

    python benchmarks/bench_rerank.py                 # CPU; on a GPU machine: --device cuda

A 1:N search of ``--probes`` probes against a gallery of ``--gallery`` templates (IJB-C's
1:N gallery has 3,531) with 512-d embeddings. Stage 1: one matrix product and each probe's top
k. Stage 2: each probe's k best templates re-scored with ``s_OT`` between local features of
7×7 and of 4×4 patches (C = 512), marginals uniform and cross, solved as one batch per chunk
of probes, with the solver settings of ``--rerank ot``. Prints milliseconds per probe and the
ratio to stage 1, with the device and load, then the cost per pair and what the 1:1 protocol,
which re-scores every template pair, would take at IJB-B's and IJB-C's pair counts.
The features are random (Gaussian), so the solves' iteration counts, the cross marginals'
especially (many patches get no mass), differ from those on real faces.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))

from otface.evaluation.rerank import RerankOptions, ot_similarity  # noqa: E402

#: Template pairs IJB-C's and IJB-B's 1:1 protocols list (each one s_OT with --rerank ot).
IJB_PAIRS = {"IJB-C": 15_658_489, "IJB-B": 8_010_270}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeat):
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probes", type=int, default=64)
    ap.add_argument("--gallery", type=int, default=3531)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    probe = torch.nn.functional.normalize(torch.randn(args.probes, 512, generator=g), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(args.gallery, 512, generator=g), dim=1)
    probe, gallery = probe.to(device), gallery.to(device)

    def stage1():
        scores = probe @ gallery.T
        return scores.topk(args.k, dim=1)

    t1 = _time(stage1, device, args.repeat)
    opts = RerankOptions()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, {torch.get_num_threads()} threads, load {load:.2f}")
    print(f"{args.probes} probes x {args.gallery} templates, k = {args.k}")
    print(f"{'stage':28s} {'ms / probe':>11s} {'x stage 1':>10s}")
    print(f"{'stage 1 (cosine, top k)':28s} {1e3 * t1 / args.probes:11.3f} {1.0:10.1f}")
    totals = []
    for side in (7, 4):
        n = side * side
        local_p = torch.randn(args.probes, n, 512, generator=g).to(device)
        local_g = torch.randn(args.k, n, 512, generator=g).to(device)
        for weights in ("uniform", "cross"):
            chunk = max(1, 4096 // args.k)

            def stage2(weights=weights, local_p=local_p, local_g=local_g, chunk=chunk):
                for s in range(0, args.probes, chunk):
                    p = local_p[s : s + chunk]
                    u = p.repeat_interleave(args.k, dim=0)
                    v = local_g.repeat(len(p), 1, 1)
                    ot_similarity(
                        u,
                        v,
                        weights=weights,
                        eps=opts.eps,
                        max_iter=opts.max_iter,
                        tol=opts.tol,
                        relaxation=opts.relaxation,
                    )

            t2 = _time(stage2, device, args.repeat)
            label = f"stage 2 ({side}x{side}, {weights})"
            per = 1e3 * (t1 + t2) / args.probes
            print(f"{label:28s} {per:11.3f} {(t1 + t2) / t1:10.1f}")
            pair_s = t2 / (args.probes * args.k)
            totals.append(
                f"1:1 {side}x{side} {weights}: {1e6 * pair_s:.1f} us / pair, "
                + ", ".join(f"{name} {n * pair_s / 60:.0f} min" for name, n in IJB_PAIRS.items())
            )
    print("every template pair re-scored (1:1), at the same cost per pair:")
    print("\n".join(totals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
