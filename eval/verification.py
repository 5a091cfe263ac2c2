"""Pair verification of a finished model on ``.bin`` sets or on a pairs list.

    python eval/verification.py --model work_dirs/NAME/model.pt --network r100 \
        --data /data/faces_emore --targets lfw,cfp_fp,agedb_30
    python eval/verification.py --model work_dirs/NAME/model.onnx --pairs my_pairs.txt
    python eval/verification.py --model work_dirs/demo_otface/model.pt --data demo

``--data demo`` is the embedded demo data (its ``.bin`` sets are the default targets). Without
``--network``, a ``model.pt`` in a training output folder is loaded as the ``network`` its
``training.log`` names. A pairs list has one ``IMAGE_A IMAGE_B LABEL`` per line (aligned 112×112
faces, label 1 = same person; relative paths start at the list's folder).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from otface.console_log import cli_logging
from otface.evaluation.bin_io import list_bin_sets, read_bin
from otface.evaluation.cli import add_model_arguments, positive_int
from otface.evaluation.data_dirs import DEMO_DATA, is_demo, resolve_data_dir
from otface.evaluation.models import Embedder, open_embedder, resolve_network
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


def _run_bins(embedder: Embedder, names: List[str], folder: Path, n_folds: int) -> None:
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
        _report(name, evaluate_pairs(embedder, read_bin(folder / f"{name}.bin"), n_folds=n_folds))


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
    args = parser.parse_args(argv)
    cli_logging(logging.INFO)
    if (args.data is None) == (args.pairs is None):
        parser.error("pass exactly one of --data (with --targets) and --pairs")
    try:
        embedder = open_embedder(
            args.model,
            network=resolve_network(args.model, args.network),
            batch_size=args.batch_size,
            device=args.device,
        )
        folder = resolve_data_dir(args.data) if args.data is not None else None
        if folder is None:
            res = evaluate_pairs(embedder, read_pairs_list(args.pairs), n_folds=args.nfolds)
            _report(Path(args.pairs).stem, res)
        else:
            _run_bins(embedder, _targets(args.targets, args.data, folder), folder, args.nfolds)
    # OSError: files (missing, unreadable, a folder where a file belongs); ImportError: an
    # optional package (onnxruntime, insightface) with its install hint.
    except (OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
