"""Time of IJB 1:N scoring at IJB-C's size, on random unit features.

    python benchmarks/bench_ijb_1n.py                 # 19,593 probes x 3,531 gallery, 512-d
    python benchmarks/bench_ijb_1n.py --probes 8104 --gallery 1845   # IJB-B's size

Prints, for each TPIR reading, the seconds of the ``(P, G)`` matrix product and of the whole
evaluation (product, ranks, CMC, TPIR at FPIR 1e-2 and 1e-1), the best of ``--repeat`` runs,
with the load average beside them. Features are random, so the figures say nothing about
accuracy; only their time matters.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))

from otface.evaluation.ijb import TemplateFeatures  # noqa: E402
from otface.evaluation.ijb_1n import FPIR_METHODS, evaluate_identification  # noqa: E402
from otface.evaluation.ijb_meta import IJB1NMeta  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", type=int, default=19_593)
    parser.add_argument("--gallery", type=int, default=3_531)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.gallery + args.probes
    feats = rng.standard_normal((n, args.dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    templates = np.arange(1, n + 1)
    pooled = TemplateFeatures(templates, feats)
    half = args.gallery // 2
    subjects = rng.permutation(args.gallery) + 1
    meta = IJB1NMeta(
        galleries=[
            ("G1", templates[:half], subjects[:half]),
            ("G2", templates[half : args.gallery], subjects[half:]),
        ],
        probe_templates=templates[args.gallery :],
        probe_subjects=rng.choice(subjects, args.probes),
        files=[],
    )
    gallery, probes = feats[: args.gallery], feats[args.gallery :]
    product = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        probes @ gallery.T
        product.append(time.perf_counter() - start)
    print(
        f"{args.probes} probes x {args.gallery} gallery x {args.dim}-d, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    print(f"matrix product: {min(product):.3f} s")
    for method in FPIR_METHODS:
        runs = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            evaluate_identification(pooled, meta, "bench", fpir_method=method)
            runs.append(time.perf_counter() - start)
        print(f"whole 1:N evaluation ({method}): {min(runs):.3f} s")
    print(f"load {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
