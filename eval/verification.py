"""Pair verification of a finished model on ``.bin`` sets or on a pairs list.

    python eval/verification.py --model work_dirs/NAME/model.pt --network r100 \
        --data /data/faces_emore --targets lfw,cfp_fp,agedb_30
    python eval/verification.py --model work_dirs/NAME/model.onnx --pairs my_pairs.txt

A pairs list has one ``IMAGE_A IMAGE_B LABEL`` per line (aligned 112×112 faces, label 1 = same
person; relative paths start at the list's folder).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from otface.evaluation.bin_io import read_bin
from otface.evaluation.models import open_embedder
from otface.evaluation.verification import VerificationResult, evaluate_pairs, read_pairs_list


def _report(name: str, res: VerificationResult) -> None:
    print(f"[{name}]XNorm: {res.xnorm:f}")
    print(f"[{name}]Accuracy: {res.accuracy:1.5f}+-{res.accuracy_std:1.5f}")
    print(f"[{name}]Accuracy-Flip: {res.accuracy_flip:1.5f}+-{res.accuracy_flip_std:1.5f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model.pt (with --network) or model.onnx")
    parser.add_argument("--network", default=None, help="backbone name for a model.pt, e.g. r100")
    parser.add_argument("--data", default=None, help="folder holding the <target>.bin files")
    parser.add_argument(
        "--targets", default="lfw,cfp_fp,agedb_30", help="comma-separated .bin names"
    )
    parser.add_argument("--pairs", default=None, help="a pairs list instead of .bin sets")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--nfolds", type=int, default=10)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.data is None) == (args.pairs is None):
        parser.error("pass exactly one of --data (with --targets) and --pairs")
    try:
        embedder = open_embedder(
            args.model, network=args.network, batch_size=args.batch_size, device=args.device
        )
        if args.pairs is not None:
            res = evaluate_pairs(embedder, read_pairs_list(args.pairs), n_folds=args.nfolds)
            _report(Path(args.pairs).stem, res)
            return 0
        found = 0
        for name in [t for t in args.targets.split(",") if t]:
            path = Path(args.data) / f"{name}.bin"
            if not path.is_file():
                print(f"[{name}] skipped: {path} not found")
                continue
            found += 1
            _report(name, evaluate_pairs(embedder, read_bin(path), n_folds=args.nfolds))
        if not found:
            print(f"error: none of {args.targets} found as .bin in {args.data}", file=sys.stderr)
            return 1
    # ImportError: an optional package (onnxruntime, insightface) with its install hint.
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
