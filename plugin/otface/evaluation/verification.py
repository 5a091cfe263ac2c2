"""Pair verification on ``.bin`` sets and pairs lists, and the in-training callback.

Reports what arcface_torch reports: 10-fold accuracy without flip (``acc1 ± std1``), with the
flip test (embedding of the image plus that of its mirror image, ``acc2 ± std2``) and ``XNorm``
(mean norm of the raw embeddings).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from torch import nn

from otface.evaluation.bin_io import PairSet, load_image_file, read_bin
from otface.evaluation.metrics import kfold_accuracy, mean_norm
from otface.evaluation.models import Embedder, TorchEmbedder
from otface.progress import Progress

__all__ = [
    "VerificationResult",
    "evaluate_embeddings",
    "evaluate_pairs",
    "distinct_rows",
    "read_pairs_list",
    "VerificationCallback",
]

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]
_CHUNK = 1024  # images embedded per step of evaluate_pairs


class VerificationResult(NamedTuple):
    """Accuracy of one pair set (fractions in [0, 1]).

    Attributes:
        accuracy, accuracy_std: 10-fold accuracy and its std without flip (``acc1``, ``std1``).
        accuracy_flip, accuracy_flip_std: the same with the flip test (``acc2``, ``std2``);
            equal to the above when flip is off.
        xnorm: mean L2 norm of the raw embeddings (original and mirrored).
        num_pairs: number of pairs.
    """

    accuracy: float
    accuracy_std: float
    accuracy_flip: float
    accuracy_flip_std: float
    xnorm: float
    num_pairs: int


def evaluate_embeddings(
    embeddings: np.ndarray,
    issame: np.ndarray,
    *,
    flipped: Optional[np.ndarray] = None,
    n_folds: int = 10,
) -> VerificationResult:
    """Scores embeddings of ``2P`` images (pair ``k`` = rows ``2k, 2k + 1``).

    Args:
        embeddings: ``(2P, D)`` raw embeddings of the images.
        issame: ``(P,)`` bool labels.
        flipped: ``(2P, D)`` raw embeddings of the mirrored images, or None (no flip test).
        n_folds: folds of the accuracy protocol (capped at ``P``).
    """
    issame = np.asarray(issame, dtype=bool)
    if len(embeddings) != 2 * len(issame):
        raise ValueError(f"{len(embeddings)} embeddings for {len(issame)} pairs")
    n_folds = min(n_folds, len(issame))
    plain = kfold_accuracy(embeddings[0::2], embeddings[1::2], issame, n_folds=n_folds)
    if flipped is None:
        return VerificationResult(
            plain.mean, plain.std, plain.mean, plain.std, mean_norm(embeddings), len(issame)
        )
    # arcface_torch normalises the sum of the raw embeddings, not of normalised ones.
    fused = embeddings.astype(np.float64) + flipped.astype(np.float64)
    flip = kfold_accuracy(fused[0::2], fused[1::2], issame, n_folds=n_folds)
    return VerificationResult(
        plain.mean, plain.std, flip.mean, flip.std, mean_norm(embeddings, flipped), len(issame)
    )


def distinct_rows(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)``: row indices of the distinct images, in first-seen order, and for
    every row the position of its image among them (``images[first][inverse] == images``)."""
    position: Dict[bytes, int] = {}
    first: List[int] = []
    inverse = np.empty(len(images), dtype=np.int64)
    for idx in range(len(images)):
        key = hashlib.blake2b(images[idx].tobytes(), digest_size=16).digest()
        pos = position.setdefault(key, len(first))
        if pos == len(first):
            first.append(idx)
        inverse[idx] = pos
    return np.asarray(first, dtype=np.int64), inverse


def evaluate_pairs(
    embedder: Embedder, pairs: PairSet, *, flip: bool = True, n_folds: int = 10
) -> VerificationResult:
    """Embeds a decoded pair set (and its mirror images when ``flip``) and scores it.

    Each distinct image is embedded once: a 6,000-pair set drawn from 1,200 photos costs 1,200
    forward passes (twice that with ``flip``), not 12,000.
    """
    first, inverse = distinct_rows(pairs.images)
    embeddings, flipped = [], []
    with Progress(len(first), "verification images") as progress:
        for start in range(0, len(first), _CHUNK):
            chunk = pairs.images[first[start : start + _CHUNK]]
            embeddings.append(embedder(chunk))
            if flip:  # mirror per chunk: no second copy of the whole set
                flipped.append(embedder(np.ascontiguousarray(chunk[..., ::-1])))
            progress.update(start + len(chunk))
    return evaluate_embeddings(
        np.concatenate(embeddings)[inverse],
        pairs.issame,
        flipped=np.concatenate(flipped)[inverse] if flip else None,
        n_folds=n_folds,
    )


def read_pairs_list(
    path: PathLike, *, image_size: Tuple[int, int] = (112, 112), root: Optional[PathLike] = None
) -> PairSet:
    """Reads a pairs list: one ``IMAGE_A IMAGE_B LABEL`` per line (label 1 = same person).

    Images must be aligned faces; relative paths are taken from ``root`` (default: the list's
    folder). Blank lines and lines starting with ``#`` are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs list {path} does not exist (or is not a file)")
    base = Path(root) if root is not None else path.parent
    images: List[np.ndarray] = []
    labels: List[bool] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 3 or fields[2] not in ("0", "1"):
                raise ValueError(
                    f"{path} line {lineno}: expected 'IMAGE_A IMAGE_B LABEL' with label 0 or 1, "
                    f"got {line.strip()!r}"
                )
            for name in fields[:2]:
                file = Path(name) if Path(name).is_absolute() else base / name
                try:
                    images.append(load_image_file(file, image_size=image_size))
                except FileNotFoundError as exc:
                    raise FileNotFoundError(f"{path} line {lineno}: {exc}") from None
            labels.append(fields[2] == "1")
    if len(labels) < 2:
        raise ValueError(f"{path} has {len(labels)} pairs; at least 2 are needed")
    return PairSet(np.stack(images), np.asarray(labels, dtype=bool))


class VerificationCallback:
    """Runs the ``.bin`` verification sets during training, in arcface_torch's log format.

    The sets ``<rec_dir>/<name>.bin`` that exist are decoded once, at construction (the trainer
    builds this on rank 0 only); missing ones are skipped with one log line. Each call embeds
    them with the backbone in eval mode on the backbone's device, logs
    ``[name][step]XNorm / Accuracy-Flip / Accuracy-Highest`` and a TensorBoard scalar per set
    (and, with ``wandb_logger``, upstream's ``Acc/val-Acc1 <set>`` / ``Acc/val-Acc2 <set>``),
    then puts the backbone back in the mode it was in.
    """

    def __init__(
        self,
        val_targets: Sequence[str],
        rec_dir: PathLike,
        *,
        summary_writer: Optional[object] = None,
        image_size: Tuple[int, int] = (112, 112),
        batch_size: int = 64,
        wandb_logger: Optional[object] = None,
    ) -> None:
        if isinstance(val_targets, str):
            raise TypeError(f"val_targets must be a list of names, got the string {val_targets!r}")
        self.summary_writer = summary_writer
        self.wandb_logger = wandb_logger
        self.batch_size = batch_size
        self.sets: Dict[str, PairSet] = {}
        self.highest: Dict[str, float] = {}
        for name in val_targets:
            path = Path(rec_dir) / f"{name}.bin"
            if not path.is_file():
                logger.info("verification set %s not found at %s; skipped", name, path)
                continue
            self.sets[name] = read_bin(path, image_size=image_size)
            self.highest[name] = 0.0
            logger.info("verification set %s: %d pairs", name, len(self.sets[name].issame))

    def __call__(self, global_step: int, backbone: nn.Module) -> Dict[str, float]:
        """Evaluates every loaded set; returns ``{name: accuracy_flip}``."""
        if not self.sets:
            return {}
        # Only rank 0 calls this: run the wrapped module, so a DDP wrapper cannot start a
        # buffer broadcast that the other ranks never join.
        if isinstance(backbone, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            backbone = backbone.module
        was_training = backbone.training
        backbone.eval()
        try:
            embedder = TorchEmbedder(backbone, batch_size=self.batch_size)
            results = {}
            for name, pairs in self.sets.items():
                res = evaluate_pairs(embedder, pairs, flip=True)
                self.highest[name] = max(self.highest[name], res.accuracy_flip)
                logger.info("[%s][%d]XNorm: %f", name, global_step, res.xnorm)
                logger.info(
                    "[%s][%d]Accuracy-Flip: %1.5f+-%1.5f",
                    name,
                    global_step,
                    res.accuracy_flip,
                    res.accuracy_flip_std,
                )
                logger.info(
                    "[%s][%d]Accuracy-Highest: %1.5f", name, global_step, self.highest[name]
                )
                if self.summary_writer is not None:
                    self.summary_writer.add_scalar(name, res.accuracy_flip, global_step)
                if self.wandb_logger is not None:
                    values = {
                        f"Acc/val-Acc1 {name}": res.accuracy,
                        f"Acc/val-Acc2 {name}": res.accuracy_flip,
                    }
                    self.wandb_logger.log(values, global_step)
                results[name] = res.accuracy_flip
            return results
        finally:
            backbone.train(was_training)
