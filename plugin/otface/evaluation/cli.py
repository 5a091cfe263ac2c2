"""Command-line pieces shared by ``eval/verification.py`` and ``eval/ijb.py``."""

from __future__ import annotations

import argparse
from typing import Optional

from otface.evaluation.rerank import PATCH_WEIGHTS, RerankOptions

__all__ = ["add_model_arguments", "add_rerank_arguments", "positive_int", "rerank_options"]


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--network``, as both evaluation commands take them."""
    parser.add_argument(
        "--model", required=True, help="model.pt, its training output folder, or model.onnx"
    )
    parser.add_argument(
        "--network",
        default=None,
        help="backbone name for a model.pt, e.g. r100 (default: the one in its training.log)",
    )


def add_rerank_arguments(parser: argparse.ArgumentParser, *, top_k: bool = False) -> None:
    """``--rerank``, ``--rerank-alpha``, ``--patch-grid``, ``--patch-weights`` (and, for 1:N,
    ``--rerank-k``)."""
    default = RerankOptions()
    parser.add_argument(
        "--rerank", choices=("none", "ot"), default="none", help="stage 2: OT re-scoring"
    )
    parser.add_argument(
        "--rerank-alpha",
        type=float,
        default=default.alpha,
        help=f"weight of s_OT in the stage-2 score (default {default.alpha}, chosen on demo_lfw)",
    )
    if top_k:
        parser.add_argument(
            "--rerank-k",
            type=positive_int,
            default=default.k,
            help=f"1:N: gallery templates re-scored per probe (default {default.k})",
        )
    parser.add_argument(
        "--patch-grid",
        type=positive_int,
        default=None,
        help="pool the local features to GRID x GRID (default: the layer's own, 7x7 for IResNet)",
    )
    parser.add_argument(
        "--patch-weights",
        choices=PATCH_WEIGHTS,
        default=default.weights,
        help="OT marginals: uniform, or cross (each patch by its likeness to the other face)",
    )


def rerank_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> Optional[RerankOptions]:
    """The checked stage-2 options of parsed ``args``, None without ``--rerank ot``; a bad
    value exits through ``parser.error`` naming it."""
    if args.rerank != "ot":
        return None
    try:
        return RerankOptions(
            alpha=args.rerank_alpha,
            k=getattr(args, "rerank_k", RerankOptions().k),
            grid=args.patch_grid,
            weights=args.patch_weights,
        ).checked()
    except ValueError as exc:
        parser.error(str(exc))
