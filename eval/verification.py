"""Pair verification of a finished model on ``.bin`` sets or on a pairs list.

    python eval/verification.py --model work_dirs/NAME/model.pt --network r100 \
        --data /data/faces_emore --targets lfw,cfp_fp,agedb_30
    python eval/verification.py --model work_dirs/NAME/model.onnx --pairs my_pairs.txt
    python eval/verification.py --model work_dirs/demo_otface/model.pt --data demo
    python eval/verification.py --model work_dirs/demo_otface/model.pt --data demo \
        --targets demo_mask --rerank ot

``--data demo`` is the embedded demo data (its ``.bin`` sets are the default targets). Without
``--network``, a ``model.pt`` in a training output folder is loaded as the ``network`` its
``training.log`` names. A pairs list has one ``IMAGE_A IMAGE_B LABEL`` per line (aligned 112×112
faces, label 1 = same person; relative paths start at the list's folder).

``--rerank ot`` re-scores every pair with ``α·s_OT + (1 − α)·cos``, ``s_OT`` the
transport-weighted cosine between the two faces' local features (the OT term's layer), and
prints stage 1 (cosine) and stage 2 side by side; a set with a ``NAME.conditions.txt`` sidecar
also gets one row per condition. Stage 2 needs a PyTorch model (``model.pt``), or beside an
ONNX model the ``model_local.onnx`` that ``python -m otface.export --local-features`` writes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from otface.console_log import cli_logging
from otface.evaluation.bin_io import list_bin_sets, read_bin
from otface.evaluation.cli import (
    add_model_arguments,
    add_rerank_arguments,
    positive_int,
    rerank_options,
)
from otface.evaluation.data_dirs import DEMO_DATA, is_demo, resolve_data_dir
from otface.evaluation.ijb import text_table
from otface.evaluation.models import Embedder, open_embedder, resolve_network
from otface.evaluation.pairs_rerank import (
    condition_accuracy,
    pair_scores,
    read_conditions,
    stage_results,
)
from otface.evaluation.rerank import RerankOptions, open_local_embedder
from otface.evaluation.verification import VerificationResult, evaluate_pairs, read_pairs_list

DEFAULT_TARGETS = "lfw,cfp_fp,agedb_30"


def _report(name: str, res: VerificationResult) -> None:
    print(f"[{name}]XNorm: {res.xnorm:f}")
    print(f"[{name}]Accuracy: {res.accuracy:1.5f}+-{res.accuracy_std:1.5f}")
    print(f"[{name}]Accuracy-Flip: {res.accuracy_flip:1.5f}+-{res.accuracy_flip_std:1.5f}")


def _targets(requested: Optional[str], data: str, folder: Path) -> List[str]:
    """The ``.bin`` names to evaluate: ``--targets``, else the demo's sets or the usual three."""
    if requested is None:
        requested = ",".join(list_bin_sets(folder)) if is_demo(data) else DEFAULT_TARGETS
    return [t.strip() for t in requested.split(",") if t.strip()]


def _pct(v: float) -> str:
    return f"{100.0 * v:.2f}"


def _evaluate(
    embedder: Embedder,
    name: str,
    pairs,
    n_folds: int,
    rerank: Optional[RerankOptions],
    conditions_of: Optional[Path] = None,
) -> None:
    """One set: stage 1 as arcface_torch prints it; with ``rerank``, stage 2 beside it and,
    where the set names its pairs' conditions, a row per condition."""
    conditions = read_conditions(conditions_of, len(pairs.issame)) if conditions_of else None
    if rerank is None and conditions is None:
        _report(name, evaluate_pairs(embedder, pairs, n_folds=n_folds))
        return
    if rerank is None:  # conditions only: the model's own embedder, no local features
        options = RerankOptions(alpha=0.0)
        scores = pair_scores(embedder, pairs, None)
    else:
        options = rerank
        scores = pair_scores(open_local_embedder(embedder, options), pairs, options)
    stage1, stage2 = stage_results(scores, options.alpha, n_folds=n_folds)
    _report(name, stage1)
    header = ["pairs", "condition", "cosine"]
    if rerank is not None:
        grid = f"{options.grid}x{options.grid}" if options.grid else "full"
        print(
            f"[{name}]rerank ot: alpha {options.alpha:g}, patch grid {grid}, "
            f"{options.weights} weights, eps {options.eps:g}"
        )
        _report(f"{name}][rerank", stage2)
        header.append("rerank ot")
    rows = [header, [str(len(scores.issame)), "all", _pct(stage1.accuracy_flip)]]
    if rerank is not None:
        rows[1].append(_pct(stage2.accuracy_flip))
    if conditions is not None:
        for cond, (n, acc1, acc2) in condition_accuracy(
            scores, conditions, options.alpha, n_folds=n_folds
        ).items():
            rows.append([str(n), cond, _pct(acc1)] + ([_pct(acc2)] if rerank else []))
    print(f"[{name}] accuracy with flip (%):")
    print("\n".join(text_table(rows)))


def _run_bins(
    embedder: Embedder,
    names: List[str],
    folder: Path,
    n_folds: int,
    rerank: Optional[RerankOptions] = None,
) -> None:
    available = list_bin_sets(folder)
    if not any(name in available for name in names):
        raise FileNotFoundError(
            f"none of {', '.join(names) or '(no targets)'} found as .bin in {folder}; "
            f".bin sets there: {', '.join(available) or 'none'}"
            + (f" (pass --targets {','.join(available)})" if available else "")
        )
    for name in names:
        if name not in available:
            print(f"[{name}] skipped: {folder / (name + '.bin')} not found")
            continue
        path = folder / f"{name}.bin"
        _evaluate(embedder, name, read_bin(path), n_folds, rerank, conditions_of=path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument(
        "--data",
        default=None,
        help=f"folder holding the <target>.bin files, or {DEMO_DATA!r} for the embedded demo data",
    )
    parser.add_argument(
        "--targets",
        default=None,
        help=f"comma-separated .bin names (default: {DEFAULT_TARGETS}; with --data demo, the "
        "demo's sets)",
    )
    parser.add_argument("--pairs", default=None, help="a pairs list instead of .bin sets")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--nfolds", type=int, default=10)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    add_rerank_arguments(parser)
    args = parser.parse_args(argv)
    cli_logging(logging.INFO)
    if (args.data is None) == (args.pairs is None):
        parser.error("pass exactly one of --data (with --targets) and --pairs")
    rerank = rerank_options(parser, args)
    try:
        embedder = open_embedder(
            args.model,
            network=resolve_network(args.model, args.network),
            batch_size=args.batch_size,
            device=args.device,
        )
        folder = resolve_data_dir(args.data) if args.data is not None else None
        if folder is None:
            pairs = read_pairs_list(args.pairs)
            _evaluate(embedder, Path(args.pairs).stem, pairs, args.nfolds, rerank)
        else:
            names = _targets(args.targets, args.data, folder)
            _run_bins(embedder, names, folder, args.nfolds, rerank)
    # OSError: files (missing, unreadable, a folder where a file belongs); ImportError: an
    # optional package (onnxruntime, insightface) with its install hint.
    except (OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
