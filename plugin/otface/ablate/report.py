"""The ablation's outputs: a text table, ``ablation.json``, ``ablation.csv`` and a PNG.

Every metric is reported per config as mean ± std over seeds (percent), and for each config
after the first as the paired difference to the first one with its 95% t-interval and the
smallest difference the run could have detected at 80% power (:mod:`otface.ablate.stats`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from otface.ablate.runner import IJB_LABELS_FILE, IJB_SCORES_FILE, RunResult
from otface.ablate.stats import PairedDifference, SeedSummary, paired_difference, summarize

__all__ = ["MetricRow", "Report", "build_report", "format_table", "write_outputs"]

logger = logging.getLogger(__name__)


class MetricRow(NamedTuple):
    """One config's values of one metric: per seed (NaN where missing), summary, difference to
    the first config (None for the first config itself)."""

    label: str
    metric: str
    values: List[float]
    summary: SeedSummary
    difference: Optional[PairedDifference]


class Report(NamedTuple):
    """All rows, with the labels, seeds and metric names in table order."""

    labels: List[str]
    seeds: List[int]
    metrics: List[str]
    rows: List[MetricRow]
    tar_method: str


def _far_name(far: float) -> str:
    return f"TAR@{far:.0e}".replace("e-0", "e-")


def _metric_values(result: RunResult) -> Dict[str, float]:
    values = dict(result.verification)
    for far, tar in zip(result.fars, result.tars):
        values[_far_name(far)] = tar
    return values


def build_report(
    results: Sequence[RunResult], labels: Sequence[str], seeds: Sequence[int], tar_method: str
) -> Report:
    """Collects ``results`` into rows: metrics in the order the runs reported them."""
    by_key = {(r.label, r.seed): _metric_values(r) for r in results}
    metrics: List[str] = []
    for values in by_key.values():
        metrics += [m for m in values if m not in metrics]
    rows = []
    for metric in metrics:
        first = None
        for label in labels:
            vals = [by_key.get((label, s), {}).get(metric, math.nan) for s in seeds]
            diff = None if first is None else paired_difference(first, vals)
            rows.append(MetricRow(label, metric, vals, summarize(vals), diff))
            if first is None:
                first = vals
    return Report(list(labels), list(seeds), metrics, rows, tar_method)


def _pct(v: float, signed: bool = False) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"


def format_table(report: Report) -> str:
    """The table as text: a row per config (mean ± std) and, under each config after the first,
    its paired difference to the first with the 95% interval, then the smallest difference
    the run could have detected (80% power, from the measured spread of the differences)."""
    cell = {(r.label, r.metric): r for r in report.rows}
    header = ["config"] + report.metrics
    body: List[List[str]] = []
    for k, label in enumerate(report.labels):
        row = [label]
        for m in report.metrics:
            s = cell[(label, m)].summary
            row.append(f"{_pct(s.mean)} ± {_pct(s.std)}" if s.n > 1 else _pct(s.mean))
        body.append(row)
        if k == 0:
            continue
        drow = [f"  Δ vs {report.labels[0]}"]
        for m in report.metrics:
            d = cell[(label, m)].difference
            ci = f" [{_pct(d.low, True)}, {_pct(d.high, True)}]" if math.isfinite(d.low) else ""
            drow.append(_pct(d.mean, True) + ci)
        body.append(drow)
        mrow = ["    detectable (80% power)"]
        for m in report.metrics:
            d = cell[(label, m)].difference
            mrow.append(f"±{_pct(d.detectable)}" if math.isfinite(d.detectable) else "n/a")
        body.append(mrow)
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(row: List[str]) -> str:
        return (
            "| "
            + " | ".join(
                v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths))
            )
            + " |"
        )

    seeds = ", ".join(map(str, report.seeds))
    notes = (
        f"{len(report.seeds)} seed(s) ({seeds}); percent; mean ± sample std over seeds; "
        f"Δ: paired difference per seed to {report.labels[0]}, mean [95% t-interval]; "
        "detectable: the smallest true Δ this run finds with 80% power (a Δ inside it that is "
        "not significant means 'not resolved', not 'equal'); "
        f"TAR read as {report.tar_method}"
    )
    return "\n".join([rule, line(header), rule, *map(line, body), rule, notes])


def _write_csv(path: Path, report: Report) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            ["config", "metric", "n_seeds", "mean", "std", "diff_mean", "diff_low", "diff_high"]
            + ["diff_detectable"]
            + [f"seed{s}" for s in report.seeds]
        )
        for r in report.rows:
            d = r.difference
            diff = [d.mean, d.low, d.high, d.detectable] if d is not None else [math.nan] * 4
            w.writerow(
                [r.label, r.metric, r.summary.n, r.summary.mean, r.summary.std, *diff, *r.values]
            )


def _json_ready(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def _write_json(path: Path, report: Report, results: Sequence[RunResult]) -> None:
    rows = [
        {
            "config": r.label,
            "metric": r.metric,
            "values": r.values,
            "mean": r.summary.mean,
            "std": r.summary.std,
            "n_seeds": r.summary.n,
            "difference": None if r.difference is None else r.difference._asdict(),
        }
        for r in report.rows
    ]
    data = {
        "configs": report.labels,
        "seeds": report.seeds,
        "metrics": report.metrics,
        "tar_method": report.tar_method,
        "rows": rows,
        "runs": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(_json_ready(data), indent=1), encoding="utf-8")


def _mean_band(curves: List[np.ndarray]):
    stack = np.stack(curves)
    return stack.mean(0), stack.min(0), stack.max(0)


def _plot(path: Path, report: Report, results: Sequence[RunResult], folders: Dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no ablation.png (pip install matplotlib)")
        return False
    from otface.evaluation.metrics import roc_curve

    curve_sets = sorted({name for r in results for name in r.curve})
    has_roc = any(r.ijb_target for r in results)
    n_axes = len(curve_sets) + int(has_roc)
    if n_axes == 0:
        return False
    fig, axes = plt.subplots(1, n_axes, figsize=(5.5 * n_axes, 4.2), squeeze=False)
    axes = list(axes[0])
    for ax, name in zip(axes, curve_sets):
        for label in report.labels:
            runs = [r.curve[name] for r in results if r.label == label and name in r.curve]
            if not runs:
                continue
            steps = sorted(set.intersection(*(set(s for s, _ in c) for c in runs)))
            if not steps:
                continue
            curves = [np.array([dict(c)[s] for s in steps]) * 100 for c in runs]
            mean, lo, hi = _mean_band(curves)
            ax.plot(steps, mean, marker="o", ms=3, label=f"{label} (n={len(runs)})")
            ax.fill_between(steps, lo, hi, alpha=0.25)
        ax.set(xlabel="training step", ylabel="accuracy with flip (%)", title=name)
        ax.grid(linestyle="--", linewidth=0.5)
        ax.legend(loc="lower right", fontsize=8)
    if has_roc:
        ax = axes[-1]
        grid = np.logspace(-5, 0, 200)
        for label in report.labels:
            curves = []
            for r in results:
                folder = folders.get((r.label, r.seed))
                if r.label != label or folder is None:
                    continue
                scores_file = Path(folder) / IJB_SCORES_FILE
                if not scores_file.is_file():
                    continue
                labels = np.load(Path(folder) / IJB_LABELS_FILE)
                roc = roc_curve(np.load(scores_file), labels)
                # TAR at each grid FAR: the highest point at or left of it (a step curve).
                idx = np.searchsorted(roc.far, grid, side="right") - 1
                curves.append(roc.tar[idx] * 100)
            if curves:
                mean, lo, hi = _mean_band(curves)
                ax.plot(grid, mean, lw=1.2, label=f"{label} (n={len(curves)})")
                ax.fill_between(grid, lo, hi, alpha=0.25)
        target = next(r.ijb_target for r in results if r.ijb_target)
        ax.set(xscale="log", xlabel="FAR", ylabel="TAR (%)", title=f"ROC on {target}")
        ax.grid(linestyle="--", linewidth=0.5)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("mean over seeds; shaded: min-max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(
    output: Path,
    report: Report,
    results: Sequence[RunResult],
    folders: Dict,
) -> List[Path]:
    """Writes ``ablation.txt``, ``.json``, ``.csv`` and ``.png`` (with matplotlib) into
    ``output``; ``folders`` maps ``(label, seed)`` to the run folder (for the IJB scores)."""
    output.mkdir(parents=True, exist_ok=True)
    written = [output / "ablation.txt", output / "ablation.json", output / "ablation.csv"]
    written[0].write_text(format_table(report) + "\n", encoding="utf-8")
    _write_json(written[1], report, results)
    _write_csv(written[2], report)
    if _plot(output / "ablation.png", report, results, folders):
        written.append(output / "ablation.png")
    return written
