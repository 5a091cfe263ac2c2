"""Runs an ablation's jobs in order, skipping finished ones, and evaluates each model.

A run is finished when ``FOLDER/result.json`` exists with the digest of the same config; it is
written atomically after training and evaluation, so a killed ablation re-run with the same
command starts at the first unfinished run. A run killed during training resumes from its last
epoch checkpoint (the ablation sets ``save_all_states``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from otface.ablate.plan import Run, write_frozen_config

__all__ = [
    "EvalSpec",
    "RunResult",
    "AblationError",
    "read_result",
    "training_curve",
    "train_subprocess",
    "evaluate_model",
    "run_all",
]

logger = logging.getLogger(__name__)
RESULT_FILE = "result.json"
IJB_SCORES_FILE = "ijb_scores.npy"
IJB_LABELS_FILE = "ijb_labels.npy"
_CURVE_LINE = re.compile(r"\[([^\]]+)\]\[(\d+)\]Accuracy-Flip: ([0-9.eE+-]+)\+-")


class AblationError(RuntimeError):
    """A run failed or a folder holds another config's results; the message names the run."""


@dataclass(frozen=True)
class EvalSpec:
    """What every model is evaluated on.

    Attributes:
        bin_sets: ``(name, path)`` of the ``.bin`` verification sets (10-fold, flip test).
        ijb: ``(folder, target)`` of an IJB-format set, or None.
        tar_method: how TAR@FAR is read (:func:`otface.evaluation.metrics.tar_at_far`).
        fars: the FAR columns.
        device: torch device for the embeddings (None: cuda when present).
        batch_size: faces per forward pass.
    """

    bin_sets: Tuple[Tuple[str, str], ...]
    ijb: Optional[Tuple[str, str]]
    tar_method: str = "arcface_torch"
    fars: Tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    device: Optional[str] = None
    batch_size: int = 128


@dataclass
class RunResult:
    """What one finished run measured (fractions in [0, 1])."""

    label: str
    seed: int
    digest: str
    seconds: float
    verification: Dict[str, float] = field(default_factory=dict)  # accuracy with flip
    verification_fold_std: Dict[str, float] = field(default_factory=dict)
    ijb_target: Optional[str] = None
    fars: List[float] = field(default_factory=list)
    tars: List[float] = field(default_factory=list)
    auc: Optional[float] = None
    curve: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)


def read_result(folder: Path) -> Optional[RunResult]:
    """The run's result, or None when it has none (yet)."""
    path = Path(folder) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["curve"] = {k: [tuple(p) for p in v] for k, v in data.get("curve", {}).items()}
        return RunResult(**data)
    except (ValueError, TypeError) as exc:
        raise AblationError(f"{path} is not a readable run result ({exc}); remove it") from None


def _write_result(folder: Path, result: RunResult) -> None:
    tmp = folder / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(result), indent=1), encoding="utf-8")
    os.replace(tmp, folder / RESULT_FILE)


def training_curve(log_file: Path) -> Dict[str, List[Tuple[int, float]]]:
    """``{set: [(step, accuracy with flip), ...]}`` from the verification lines of a
    ``training.log`` (the last value wins where a resumed run logged a step twice)."""
    curves: Dict[str, Dict[int, float]] = {}
    if not Path(log_file).is_file():
        return {}
    with open(log_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _CURVE_LINE.search(line)
            if m:
                curves.setdefault(m.group(1), {})[int(m.group(2))] = float(m.group(3))
    return {name: sorted(points.items()) for name, points in curves.items()}


def _package_root() -> str:
    import otface

    return str(Path(otface.__file__).resolve().parents[1])


def train_subprocess(run: Run, *, launcher: Sequence[str] = (), resume: bool = False) -> None:
    """Trains ``run`` in a child process: ``LAUNCHER -m otface.ablate.train_run FOLDER/config.py``
    (``LAUNCHER`` default: this Python; e.g. ``torchrun --nproc_per_node=8``). Its output goes
    to ``FOLDER/train.out``.

    Raises:
        AblationError: the training failed, with the end of its output.
        KeyboardInterrupt: the training was interrupted (exit code 130).
    """
    config_file = write_frozen_config(run, resume=resume)
    cmd = [*(launcher or [sys.executable]), "-m", "otface.ablate.train_run", config_file]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(), env.get("PYTHONPATH")]))
    out_file = run.folder / "train.out"
    with open(out_file, "ab") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode == 130:
        raise KeyboardInterrupt
    if proc.returncode != 0:
        tail = out_file.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        raise AblationError(
            f"training {run.arm.label} seed {run.seed} failed (exit code {proc.returncode}): "
            f"{shlex.join(cmd)}\n  " + "\n  ".join(tail) + f"\n(full output in {out_file})"
        )


def evaluate_model(run: Run, spec: EvalSpec) -> RunResult:
    """Evaluates ``FOLDER/model.pt`` on the spec's sets; the IJB scores are kept as ``.npy``."""
    from otface.evaluation.bin_io import read_bin
    from otface.evaluation.ijb import FeatureOptions, VerifyOptions, evaluate_ijb
    from otface.evaluation.models import open_embedder
    from otface.evaluation.verification import evaluate_pairs

    embedder = open_embedder(
        run.folder / "model.pt",
        network=run.cfg.network,
        batch_size=spec.batch_size,
        device=spec.device,
    )
    result = RunResult(run.arm.label, run.seed, run.digest, 0.0)
    for name, path in spec.bin_sets:
        res = evaluate_pairs(embedder, read_bin(path), flip=True)
        result.verification[name] = res.accuracy_flip
        result.verification_fold_std[name] = res.accuracy_flip_std
    if spec.ijb is not None:
        folder, target = spec.ijb
        ijb = evaluate_ijb(
            embedder,
            folder,
            target,
            features=FeatureOptions(num_workers=2),
            verify=VerifyOptions(fars=spec.fars, tar_method=spec.tar_method),
        )
        np.save(run.folder / IJB_SCORES_FILE, ijb.scores)
        np.save(run.folder / IJB_LABELS_FILE, ijb.labels.astype(np.int8))
        result.ijb_target = target
        result.fars = [float(f) for f in ijb.fars]
        result.tars = [float(t) for t in ijb.tars]
        result.auc = ijb.auc
    return result


def _eta(seconds: List[float], remaining: int) -> str:
    if not seconds:
        return "ETA unknown until the first run ends"
    left = int(round(np.mean(seconds) * remaining))
    return f"ETA {left // 3600:d}:{left % 3600 // 60:02d}:{left % 60:02d}"


def run_all(
    runs: Sequence[Run],
    spec: EvalSpec,
    *,
    train: Optional[Callable[[Run, bool], None]] = None,
    evaluate: Callable[[Run, EvalSpec], RunResult] = evaluate_model,
    progress: Callable[[str], None] = print,
) -> List[RunResult]:
    """Runs every unfinished run in order, then evaluates it; returns all results in order.

    Args:
        runs: from :func:`otface.ablate.plan.plan_runs`.
        spec: what to evaluate on.
        train: ``train(run, resume)``; default :func:`train_subprocess`.
        evaluate: ``evaluate(run, spec)`` → :class:`RunResult`.
        progress: receives one line per run (which run, and the ETA).

    Raises:
        AblationError: a run failed, or a run folder holds a result of another config.
    """
    if train is None:

        def train(run: Run, resume: bool) -> None:
            train_subprocess(run, resume=resume)

    from otface.train.checkpoint import checkpoint_path

    results: List[Optional[RunResult]] = []
    durations: List[float] = []
    for run in runs:
        done = read_result(run.folder)
        if done is not None and done.digest != run.digest:
            raise AblationError(
                f"{run.folder} holds a finished run of another config (digest {done.digest}, "
                f"now {run.digest}): pass another --output, or remove that folder to redo it"
            )
        results.append(done)
        if done is not None:
            durations.append(done.seconds)
    n = len(runs)
    for k, run in enumerate(runs):
        name = f"{run.arm.label} seed {run.seed}"
        if results[k] is not None:
            progress(f"[ablate] run {k + 1}/{n}: {name}: finished earlier, skipped")
            continue
        remaining = sum(r is None for r in results)
        progress(f"[ablate] run {k + 1}/{n}: {name} ({_eta(durations, remaining)})")
        start = time.perf_counter()
        run.folder.mkdir(parents=True, exist_ok=True)
        resume = os.path.isfile(checkpoint_path(str(run.folder), 0))
        if resume:
            progress(f"[ablate]   resuming from {checkpoint_path(str(run.folder), 0)}")
        train(run, resume)
        result = evaluate(run, spec)
        result.seconds = time.perf_counter() - start
        result.curve = training_curve(run.folder / "training.log")
        _write_result(run.folder, result)
        results[k] = result
        durations.append(result.seconds)
    return [r for r in results if r is not None]
