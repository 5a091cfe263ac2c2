"""Evaluation: ``.bin`` pair verification (LFW protocol), IJB-B/IJB-C 1:1, model loading.

The trainer uses :class:`VerificationCallback`; ``eval/verification.py`` and ``eval/ijb.py``
are the command lines over these modules.
"""

from otface.evaluation.bin_io import PairSet, read_bin, write_bin
from otface.evaluation.ijb import IJBResult, evaluate_ijb, pool_templates, score_pairs
from otface.evaluation.ijb_meta import IJBLayoutError, IJBMeta, read_ijb_meta
from otface.evaluation.metrics import kfold_accuracy, roc_curve, tar_at_far
from otface.evaluation.models import (
    OnnxEmbedder,
    TorchEmbedder,
    load_backbone,
    load_backbone_state,
    open_embedder,
)
from otface.evaluation.verification import (
    VerificationCallback,
    VerificationResult,
    evaluate_embeddings,
    evaluate_pairs,
    read_pairs_list,
)

__all__ = [
    "PairSet",
    "read_bin",
    "write_bin",
    "IJBResult",
    "evaluate_ijb",
    "pool_templates",
    "score_pairs",
    "IJBLayoutError",
    "IJBMeta",
    "read_ijb_meta",
    "kfold_accuracy",
    "roc_curve",
    "tar_at_far",
    "OnnxEmbedder",
    "TorchEmbedder",
    "load_backbone",
    "load_backbone_state",
    "open_embedder",
    "VerificationCallback",
    "VerificationResult",
    "evaluate_embeddings",
    "evaluate_pairs",
    "read_pairs_list",
]
