"""Hard faces, 1:N and 1:1: each model of one or more ablations on the demo's IJB targets
``demo`` (clean probes) and ``demo_occluded`` (the same probe templates with an occluder), scored
by cosine and with ``--rerank ot``.

    python benchmarks/hard_faces_ijb.py work_dirs/hard_faces/default

For every finished ``ARM/seedN/model.pt`` (as ``otface.ablate`` writes them) and both targets it
runs what ``eval/ijb.py --protocol all --rerank ot`` runs (the same library functions, the
re-scoring settings chosen on ``demo_lfw``: the layer's own 7×7 grid, uniform marginals,
α 0.2, k 100), keeps rank-1, rank-5, TPIR at FPIR 1e-1 and TAR at FAR 1e-3 and 1e-4 of both
stages in ``hard_faces_ijb.json`` in the ablation folder, and prints them as mean ± std over
seeds for each arm, with the paired differences (re-scoring − cosine, and each arm − the first
arm) and the smallest difference the seeds could detect, as ``otface.ablate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hard_faces import _diff, _fmt, score_folder  # noqa: E402

from otface.ablate.stats import paired_difference, summarize  # noqa: E402
from otface.evaluation.ijb import FeatureOptions, VerifyOptions, verify_templates  # noqa: E402
from otface.evaluation.ijb_1n import evaluate_identification  # noqa: E402
from otface.evaluation.ijb_meta import read_ijb_1n_meta  # noqa: E402
from otface.evaluation.ijb_rerank import (  # noqa: E402
    rerank_identification,
    rerank_verification,
    template_features_with_local,
)
from otface.evaluation.models import load_backbone  # noqa: E402
from otface.evaluation.rerank import LocalEmbedder, RerankOptions  # noqa: E402

TARGETS = ("demo", "demo_occluded")
FARS = (1e-4, 1e-3)
METRICS = ("rank1", "rank5", "tpir@1e-1", "tar@1e-4", "tar@1e-3")


def score_model(model_pt: Path, ijb: Path, network: str, options: RerankOptions) -> dict:
    net = load_backbone(model_pt, network=network, device="cpu").eval()
    out = {}
    for target in TARGETS:
        meta, pooled, local = template_features_with_local(
            LocalEmbedder(net, batch_size=128), ijb, target, options=FeatureOptions(num_workers=2)
        )
        verify = VerifyOptions(fars=FARS)
        v1 = verify_templates(meta, pooled, target, options=verify)
        v2, _ = rerank_verification(meta, pooled, local, v1, options, verify=verify)
        lists = read_ijb_1n_meta(ijb, target, pooled.templates)
        i1 = evaluate_identification(pooled, lists, target)
        i2, _ = rerank_identification(i1, local, options)
        out[target] = {
            stage: {
                "rank1": float(i.rank_rates[0]),
                "rank5": float(i.rank_rates[1]),
                "tpir@1e-1": float(i.tpirs[1]),
                "tar@1e-4": float(v.tars[0]),
                "tar@1e-3": float(v.tars[1]),
            }
            for stage, i, v in (("cos", i1, v1), ("rerank", i2, v2))
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ablations", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=None, help="demo folder (default: the cache's)")
    ap.add_argument("--network", default="r18_lite")
    args = ap.parse_args(argv)
    if args.data is None:
        from otface.demo import ensure_demo

        args.data = ensure_demo()
    options = RerankOptions()
    for folder in args.ablations:
        table = score_folder(
            folder,
            "hard_faces_ijb.json",
            lambda m: score_model(m, args.data / "ijb", args.network, options),
        )
        arms = sorted({k.split("/")[0] for k in table}, key=lambda a: (a != "demo_arcface", a))
        if not arms:
            continue
        common = set.intersection(
            *({k.split("/")[1] for k in table if k.startswith(a + "/")} for a in arms)
        )
        print(f"\n== training data: {folder.name} ({len(common)} seeds) ==")
        print(
            f"re-scoring: grid {options.grid or 'own'}, {options.weights}, alpha {options.alpha}, "
            f"k {options.k}"
        )
        for target in TARGETS:
            for metric in METRICS:
                print(f"-- {target} / {metric}")
                base = None
                for arm in arms:
                    runs = [table[f"{arm}/{s}"][target] for s in sorted(common)]
                    cos = [r["cos"][metric] for r in runs]
                    ot = [r["rerank"][metric] for r in runs]
                    line = f"   {arm:14s} cos {_fmt(summarize(cos))}  rerank {_fmt(summarize(ot))}"
                    line += f"  rerank-cos {_diff(paired_difference(cos, ot))}"
                    if base is None:
                        base = cos
                    else:
                        line += f"  vs {arms[0]} (cos) {_diff(paired_difference(base, cos))}"
                    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
