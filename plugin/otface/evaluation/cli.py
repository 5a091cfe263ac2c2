"""Command-line pieces shared by ``eval/verification.py`` and ``eval/ijb.py``."""

from __future__ import annotations

import argparse

__all__ = ["add_model_arguments", "positive_int"]


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
