"""What the OT term did in each run of an ablation, from the runs' ``training.log``.

    python benchmarks/ablation_logs.py work_dirs/ablation_ot

For every config of the ablation folder (``CONFIG/seedN/training.log``), the mean over its seeds
of the per-run averages of the OTFace log fields (hard triplets per batch, the OT loss, the
anchor-positive and anchor-negative distances, the hinge's mean argument ``w_ap - w_an +
ot_margin`` (above 0: the hinge pulls on average), the OT term's gradient share on the backbone
and at the hooked layer, and the worst ``sinkhorn_unconverged`` of any log line), over the
whole run and over its last epoch, and each run's wall time from ``ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

FIELDS = ("n_hard", "loss_ot", "w_ap", "w_an", "ot_grad_share", "ot_grad_share_layer")
_NUM = r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf)"


def read_log(path: Path) -> list[dict]:
    """One dict per training line: ``step``, ``epoch`` and the OTFace fields it carries."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        step = re.search(r"Global Step: (\d+)", line)
        if step is None:
            continue
        row = {"step": int(step[1]), "epoch": int(re.search(r"Epoch: (\d+)", line)[1])}
        for name in (*FIELDS, "sinkhorn_unconverged"):
            m = re.search(rf"\b{name} ({_NUM})\b", line)
            if m:
                row[name] = float(m[1])
        rows.append(row)
    return rows


def summarize_run(rows: list[dict], margin: float) -> dict:
    out = {}
    last_epoch = max(r["epoch"] for r in rows)
    for scope, sel in (("all", rows), ("last", [r for r in rows if r["epoch"] == last_epoch])):
        for name in FIELDS:
            values = [r[name] for r in sel if name in r]
            out[f"{name}/{scope}"] = statistics.mean(values) if values else float("nan")
        gaps = [r["w_ap"] - r["w_an"] + margin for r in sel if "w_ap" in r and "w_an" in r]
        out[f"hinge_arg/{scope}"] = statistics.mean(gaps) if gaps else float("nan")
    unconverged = [r["sinkhorn_unconverged"] for r in rows if "sinkhorn_unconverged" in r]
    out["unconverged_max"] = max(unconverged) if unconverged else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="the ablation's --output folder")
    parser.add_argument("--ot-margin", type=float, default=0.05)
    args = parser.parse_args()
    seconds = {}
    report = args.folder / "ablation.json"
    if report.is_file():
        for run in json.loads(report.read_text())["runs"]:
            seconds.setdefault(run["label"], []).append(run.get("seconds") or float("nan"))
    configs = sorted(p for p in args.folder.iterdir() if p.is_dir())
    columns = ["hinge_arg", *FIELDS]
    print(f"{args.folder}: per config, mean over seeds of each run's mean (whole run / last epoch)")
    print(
        f"{'config':40s} {'seeds':>5s} "
        + " ".join(f"{c:>22s}" for c in columns)
        + f" {'unconv max':>10s} {'run s':>7s}"
    )
    for config in configs:
        runs = [
            summarize_run(read_log(log), args.ot_margin)
            for log in sorted(config.glob("seed*/training.log"))
        ]
        runs = [r for r in runs if r]
        if not runs:
            continue
        cells = []
        for c in columns:
            pair = [statistics.mean(r[f"{c}/{s}"] for r in runs) for s in ("all", "last")]
            cells.append(f"{pair[0]:10.4g} / {pair[1]:9.4g}")
        unconv = max(r["unconverged_max"] for r in runs)
        secs = seconds.get(config.name, [])
        mean_s = statistics.mean(secs) if secs else float("nan")
        print(
            f"{config.name:40s} {len(runs):5d} "
            + " ".join(cells)
            + f" {unconv:10.4g} {mean_s:7.0f}"
        )


if __name__ == "__main__":
    main()
