"""Hard faces: each model of one or more ablations scored by cosine and by OT re-scoring.

    python benchmarks/hard_faces.py work_dirs/hard_faces/default work_dirs/hard_faces/clean

For every ``model.pt`` under the ablation folders (``ARM/seedN/model.pt``, as ``otface.ablate``
writes them) and every demo ``.bin`` set, it embeds each distinct face once, keeps the local
features of the OT term's layer, and solves every pair's OT problem at each patch grid and
marginal choice. Stage 2 is then read at every α of a grid, for free. It writes
``hard_faces.json`` into each ablation folder (one entry per model) and prints:

* α, grid and marginals chosen on ``demo_lfw`` alone (the best mean accuracy over all models);
* per set (and per condition where the set names them): cosine and re-scored accuracy, mean ±
  std over seeds for each arm, with the paired differences (re-scoring − cosine, and each arm
  − the first arm) and the smallest difference the seeds could detect, as ``otface.ablate``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugin"))

from otface.ablate.stats import paired_difference, summarize  # noqa: E402
from otface.evaluation.bin_io import read_bin  # noqa: E402
from otface.evaluation.metrics import (  # noqa: E402
    kfold_accuracy_from_distances,
    pair_distances,
    subset_accuracy,
)
from otface.evaluation.models import load_backbone, preprocess  # noqa: E402
from otface.evaluation.pairs_rerank import read_conditions  # noqa: E402
from otface.evaluation.rerank import local_points, ot_similarity  # noqa: E402
from otface.evaluation.verification import distinct_rows  # noqa: E402
from otface.hooks import FeatureCapture  # noqa: E402

SETS = ("demo_lfw", "demo_hard", "demo_mask", "demo_crop")
GRIDS = (None, 4)
WEIGHTS = ("uniform", "cross")
ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 11))


def _embed(net, images, grids, batch=128):
    """Embeddings of the faces and of their mirrors, and the local features at each grid."""
    emb, flip = [], []
    local = {g: [] for g in grids}
    with torch.no_grad(), FeatureCapture(net) as cap:
        for s in range(0, len(images), batch):
            chunk = torch.from_numpy(np.ascontiguousarray(images[s : s + batch]))
            emb.append(net(preprocess(chunk)).float().numpy())
            fmap = cap.pop().float()
            for g in grids:
                pts = torch.nn.functional.normalize(local_points(fmap, g), dim=-1)
                local[g].append(pts.numpy())
            flip.append(net(preprocess(torch.flip(chunk, dims=[3]))).float().numpy())
    return (
        np.concatenate(emb),
        np.concatenate(flip),
        {g: np.concatenate(v) for g, v in local.items()},
    )


def _s_ot(local, rows_a, rows_b, weights, chunk=500):
    out = []
    for s in range(0, len(rows_a), chunk):
        a = torch.from_numpy(local[rows_a[s : s + chunk]])
        b = torch.from_numpy(local[rows_b[s : s + chunk]])
        out.append(ot_similarity(a, b, weights=weights).score.double().numpy())
    return np.concatenate(out)


def score_model(model_pt: Path, data: Path, network: str) -> dict:
    net = load_backbone(model_pt, network=network, device="cpu").eval()
    result = {}
    for name in SETS:
        pairs = read_bin(data / f"{name}.bin")
        first, inverse = distinct_rows(pairs.images)
        emb, flip, local = _embed(net, pairs.images[first], GRIDS)
        emb, flip = emb[inverse], flip[inverse]
        fused = emb.astype(np.float64) + flip.astype(np.float64)
        d_cos = pair_distances(fused[0::2], fused[1::2])
        issame = np.asarray(pairs.issame, bool)
        conditions = read_conditions(data / f"{name}.bin", len(issame))
        entry = {"cos_dist": d_cos.tolist(), "s_ot": {}}
        ia, ib = inverse[0::2], inverse[1::2]
        for g in GRIDS:
            for w in WEIGHTS:
                key = f"{g or 7}x{g or 7}-{w}"
                # Local features are indexed by distinct image, as ``inverse`` is.
                entry["s_ot"][key] = _s_ot(local[g], ia, ib, w).tolist()
        entry["issame"] = issame.tolist()
        entry["conditions"] = None if conditions is None else conditions.tolist()
        result[name] = entry
    return result


def accuracies(entry: dict, key: str, alpha: float) -> dict:
    """Flip-test accuracy of the whole set and of each condition at one α."""
    d_cos = np.asarray(entry["cos_dist"])
    issame = np.asarray(entry["issame"], bool)
    d = (
        d_cos
        if alpha == 0.0
        else (1 - alpha) * d_cos + alpha * (2 - 2 * np.asarray(entry["s_ot"][key]))
    )
    k = kfold_accuracy_from_distances(d, issame, n_folds=10)
    out = {"all": k.mean}
    if entry["conditions"] is not None:
        cond = np.asarray(entry["conditions"])
        for c in sorted(set(cond.tolist())):
            out[c] = subset_accuracy(d, issame, k.fold_threshold, cond == c)
    return out


def _models(folder: Path):
    # A run's model.pt is rewritten every epoch: only finished runs (result.json) count.
    for model in sorted(folder.glob("*/seed*/model.pt")):
        if (model.parent / "result.json").is_file():
            yield model.parent.parent.name, int(model.parent.name[4:]), model


def score_folder(folder: Path, cache_name: str, score) -> dict:
    """``{"ARM/seedN": score(model.pt)}`` for every finished run of an ablation folder, kept in
    ``folder/cache_name`` so that a second call scores only the models added since."""
    cache = folder / cache_name
    table = json.loads(cache.read_text()) if cache.is_file() else {}
    for arm, seed, model in _models(folder):
        key = f"{arm}/seed{seed}"
        if key not in table:
            start = time.perf_counter()
            table[key] = score(model)
            print(f"scored {folder.name}/{key} in {time.perf_counter() - start:.0f} s", flush=True)
            tmp = cache.with_name(cache.name + ".tmp")
            tmp.write_text(json.dumps(table))
            tmp.replace(cache)  # atomic: an interrupted run keeps the models scored before
    return table


def _fmt(s):
    return f"{100 * s.mean:6.2f} ± {100 * s.std:4.2f}"


def _diff(d):
    return (
        f"{100 * d.mean:+5.2f} [{100 * d.low:+5.2f}, {100 * d.high:+5.2f}] "
        f"(detectable ±{100 * d.detectable:.2f})"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ablations", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=None, help="demo folder (default: the cache's)")
    ap.add_argument("--network", default="r18_lite")
    ap.add_argument(
        "--setting",
        default=None,
        help="report at this setting instead of choosing one on demo_lfw, e.g. 7x7-uniform:0.2 "
        "(to compare new models at a setting chosen before they existed)",
    )
    args = ap.parse_args(argv)
    if args.data is None:
        from otface.demo import ensure_demo

        args.data = ensure_demo()
    scored = {
        folder.name: score_folder(
            folder, "hard_faces.json", lambda m: score_model(m, args.data, args.network)
        )
        for folder in args.ablations
    }
    keys = [f"{g or 7}x{g or 7}-{w}" for g in GRIDS for w in WEIGHTS]
    # Chosen on demo_lfw only: the (grid, weights, alpha) with the best mean over all models.
    best = max(
        ((key, a) for key in keys for a in ALPHAS if a > 0),
        key=lambda ka: np.mean(
            [
                accuracies(m["demo_lfw"], ka[0], ka[1])["all"]
                for t in scored.values()
                for m in t.values()
            ]
        ),
    )
    key, alpha = best
    print(f"\nchosen on demo_lfw: {key}, alpha {alpha}")
    if args.setting:
        key, alpha = args.setting.split(":")[0], float(args.setting.split(":")[1])
        print(f"reported at the given setting: {key}, alpha {alpha}")
    for data_name, table in scored.items():
        if not table:
            continue
        arms = sorted({k.split("/")[0] for k in table}, key=lambda a: (a != "demo_arcface", a))
        # Seeds every arm has, so that the differences pair seed with seed.
        common = set.intersection(
            *({k.split("/")[1] for k in table if k.startswith(a + "/")} for a in arms)
        )
        print(f"\n== training data: {data_name} ({len(common)} seeds) ==")
        for name in SETS:
            rows = {}
            for arm in arms:
                seeds = [f"{arm}/{seed}" for seed in sorted(common)]
                cos = [accuracies(table[s][name], key, 0.0) for s in seeds]
                ot = [accuracies(table[s][name], key, alpha) for s in seeds]
                rows[arm] = (cos, ot)
            conds = list(rows[arms[0]][0][0])
            for c in conds:
                print(f"-- {name} / {c}")
                base_cos = [r[c] for r in rows[arms[0]][0]]
                for arm in arms:
                    cos = [r[c] for r in rows[arm][0]]
                    ot = [r[c] for r in rows[arm][1]]
                    line = f"   {arm:14s} cos {_fmt(summarize(cos))}  rerank {_fmt(summarize(ot))}"
                    line += f"  rerank-cos {_diff(paired_difference(cos, ot))}"
                    if arm != arms[0]:
                        line += f"  vs {arms[0]} (cos) {_diff(paired_difference(base_cos, cos))}"
                    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
