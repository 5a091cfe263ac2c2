"""What template-level local features cost at IJB-C's size: memory and time of the pooling that
``eval/ijb.py --rerank ot`` adds to the feature pass, and the size of their cache.

    python benchmarks/bench_ijb_local.py            # IJB-C: 469,375 faces, 23,124 templates

The faces' layout (template and media of each face) is drawn at IJB-C's counts; each face's
local features are random unit vectors, fed in batches as the embedder gives them. The network's
forward pass is not timed (it is the same pass stage 1 makes). For each grid it prints the time
per 1,000 faces, the whole pass, the growth of the process's peak memory, the pooled array and
the cache file.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))

from otface.evaluation.ijb import write_feature_cache  # noqa: E402
from otface.evaluation.ijb_meta import IJBMeta  # noqa: E402
from otface.evaluation.ijb_rerank import LocalPool  # noqa: E402

IJBC_FACES, IJBC_TEMPLATES, IJBC_MEDIAS = 469_375, 23_124, 140_000


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", type=int, default=IJBC_FACES)
    ap.add_argument("--templates", type=int, default=IJBC_TEMPLATES)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--timed-faces", type=int, default=50_000, help="faces actually fed")
    ap.add_argument("--grid", type=int, choices=(4, 7), default=None, help="one grid only")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    templates = np.sort(rng.integers(0, args.templates, args.faces))
    medias = templates * 8 + rng.integers(0, 6, args.faces)  # a few medias per template
    meta = IJBMeta(
        image_names=[],
        landmarks=np.zeros((0, 5, 2), np.float32),
        faceness=rng.uniform(0.3, 1.0, args.faces).astype(np.float32),
        templates=templates,
        medias=medias,
        pair_templates=np.zeros((0, 2), np.int64),
        pair_labels=np.zeros(0, np.int64),
        image_dir=Path("."),
    )
    if args.grid is None:  # each grid in a process of its own: peak memory is per process
        import subprocess

        load = os.getloadavg()[0]
        n_templates = len(np.unique(templates))
        print(f"{args.faces:,} faces, {n_templates:,} templates, C = {args.channels}, "
              f"{torch.get_num_threads()} threads, load {load:.2f}")  # fmt: skip
        for side in (4, 7):
            cmd = [sys.executable, __file__, *(argv or sys.argv[1:]), "--grid", str(side)]
            subprocess.run(cmd, check=True)
        return 0
    for side in (args.grid,):
        n = side * side
        before = _peak_mib()
        pool = LocalPool(meta, faceness=True)
        points = torch.nn.functional.normalize(
            torch.randn(args.batch, n, args.channels), dim=-1
        ).numpy()
        order = rng.permutation(args.faces)[: args.timed_faces]
        start = time.perf_counter()
        for s in range(0, len(order), args.batch):
            idx = order[s : s + args.batch]
            pool.add(idx, points[: len(idx)])
        per_face = (time.perf_counter() - start) / len(order)
        local = pool.result()
        grown = _peak_mib() - before
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "local.npy"
            write_feature_cache(cache, local.local)
            size = cache.stat().st_size / 2**20
        print(
            f"{side}x{side}: {1e6 * per_face:.1f} ms per 1,000 faces, "
            f"{per_face * args.faces:.0f} s for all; peak memory +{grown:,.0f} MiB; "
            f"pooled {local.local.nbytes / 2**20:,.0f} MiB float16; cache file {size:,.0f} MiB"
        )
        del pool, local
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
