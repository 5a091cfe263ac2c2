"""The GPU targets, met or not, from the logs that ``benchmarks/gpu_check.sh`` wrote.

    python benchmarks/gpu_summary.py work_dirs/gpu_check     # the check's output folder

``gpu_check.sh`` runs this last and keeps the table as ``summary.md`` beside the part logs.
Each row is one target: what the run measured (with the spread the benchmark printed), and
whether the target is met. A part that did not run, failed before its result, or printed
nothing recognisable shows as "not measured", never as met. Rows of our step without a target
(``otface``, the fused and compiled variants) are listed for comparison: the step targets apply
to the ``arcface`` row, the eager step that ships by default, and are re-judged here for each
variant so that a default can follow the figures.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import NamedTuple, Optional

__all__ = ["Row", "StepRow", "read_step_rows", "summarize", "main"]

# Our step over arcface_torch's, per network (the GPU-step issue's targets).
STEP_TARGETS = {"r100": 0.60, "r50": 0.50}
# Networks compared without a target yet (gpu_check.sh's ViT part): listed when their log exists.
UNTARGETED_NETS = ("vit_t", "vit_b")
MAX_SYNCS = 1
MIN_LOOP_OVER_STEP = 0.95
MAX_COMPILE_S = 120.0

_NUM = r"[-+]?\d+(?:\.\d+)?"
_STEP_LINE = re.compile(
    rf"^(?P<name>\S+)\s+(?P<layout>NCHW|NHWC)\s+(?P<ms>{_NUM}) \[[^\]]*\] \([^)]*\)\s+"
    rf"(?:1 \(anchor\)|(?P<ratio>{_NUM}) \[(?P<q1>{_NUM})-(?P<q3>{_NUM})\] \([^)]*\))\s+"
    rf"(?P<n_hard>\S+)\s+(?P<first>\S+)\s*$"
)


class Row(NamedTuple):
    """One line of the summary: ``verdict`` is ``"met"``, ``"missed"``, ``"not measured
    (why)"`` or ``"-"`` (no target)."""

    check: str
    target: str
    measured: str
    verdict: str
    source: str


class StepRow(NamedTuple):
    """One contender of a ``bench_step.py --arcface-torch`` table."""

    name: str
    layout: str
    step_ms: float
    ratio: Optional[float]  # None for the anchor
    q1: Optional[float]
    q3: Optional[float]
    first_s: Optional[float]


def _read(folder: Path, part: str) -> Optional[str]:
    path = folder / f"{part}.txt"
    return path.read_text(errors="replace") if path.is_file() else None


def _missing(folder: Path, part: str) -> str:
    """Why a part's result is absent: it did not run, it failed, or its log holds none."""
    if not (folder / f"{part}.txt").is_file():
        return "not measured (part not run)"
    rc_file = folder / f"{part}.rc"
    rc = rc_file.read_text().strip() if rc_file.is_file() else ""
    if rc == "budget":
        return "not measured (skipped: BUDGET_S spent)"
    if rc in ("124", "137"):
        return "not measured (part hit its time limit)"
    if rc and rc != "0":
        return f"not measured (part failed, exit {rc})"
    return "not measured (no result in the log)"


def _float(text: str) -> Optional[float]:
    try:
        value = float(text)
    except ValueError:
        return None
    return None if value != value else value  # nan: not measured


def read_step_rows(text: str) -> list[StepRow]:
    """The contenders of a ``bench_step.py --arcface-torch`` comparison table."""
    rows = []
    for line in text.splitlines():
        m = _STEP_LINE.match(line.rstrip())
        if m is None:
            continue
        ratio = m["ratio"]
        rows.append(
            StepRow(
                m["name"],
                m["layout"],
                float(m["ms"]),
                float(ratio) if ratio is not None else None,
                float(m["q1"]) if ratio is not None else None,
                float(m["q3"]) if ratio is not None else None,
                _float(m["first"]),
            )
        )
    return rows


def _row(folder: Path, check: str, target: str, part: str, found, ok: bool) -> Row:
    """A judged row: ``found`` is what was measured (None when nothing was)."""
    if found is None:
        return Row(check, target, "-", _missing(folder, part), part)
    return Row(check, target, found, "met" if ok else "missed", part)


def _step_rows(folder: Path) -> list[Row]:
    out = []
    extra = [n for n in UNTARGETED_NETS if (folder / f"vs_upstream_{n}.txt").is_file()]
    for net, target in [*STEP_TARGETS.items(), *((n, None) for n in extra)]:
        part = f"vs_upstream_{net}"
        text = _read(folder, part)
        rows = read_step_rows(text) if text else []
        anchor = next((r for r in rows if r.ratio is None), None)
        ours = [r for r in rows if r.ratio is not None]
        bound = "-" if target is None else f"≤ {target:.2f}"
        if anchor is None or not ours:
            out.append(
                _row(folder, f"our `arcface` / upstream step, {net}", bound, part, None, False)
            )
            continue
        for r in ours:
            measured = (
                f"{r.ratio:.3f} [IQR {r.q1:.3f}-{r.q3:.3f}] "
                f"({r.step_ms:.1f} vs {anchor.step_ms:.1f} ms)"
            )
            compiled = "+" in r.name and not r.name.endswith(("+fused", "+graph"))
            if compiled and r.first_s is not None:
                measured += f"; first step {r.first_s:.1f} s"
            check = f"our `{r.name}` / upstream step, {net}"
            if r.name.split("+")[0] == "arcface" and target is not None:
                out.append(_row(folder, check, bound, part, measured, r.ratio <= target))
            else:
                out.append(Row(check, "-", measured, "-", part))
    return out


def _search(folder: Path, part: str, pattern: str) -> Optional[re.Match]:
    text = _read(folder, part)
    return re.search(pattern, text, re.MULTILINE) if text else None


def summarize(folder: Path) -> tuple[str, list[Row]]:
    """The device line and the rows of the summary of the logs in ``folder``."""
    env = (_read(folder, "env") or "").strip().splitlines()
    device = env[-1] if env else "unknown"
    rows = _step_rows(folder)

    m = _search(folder, "sync_debug", r"^host syncs in one otface step: (\d+)")
    rows.append(
        _row(
            folder,
            "host syncs in one fp16 `otface` step",
            f"≤ {MAX_SYNCS}",
            "sync_debug",
            m and m[1],
            bool(m) and int(m[1]) <= MAX_SYNCS,
        )
    )
    loops = [("loop_vs_step", "")]
    if (folder / "loop_graph.txt").is_file():
        loops.append(("loop_graph", ", cuda_graph on"))
    for part, tag in loops:
        m = _search(folder, part, rf"^loop / step throughput: median ({_NUM}) \(range (\S+)")
        rate = _search(folder, part, rf"^loop\s+({_NUM})")
        rows.append(
            _row(
                folder,
                f"train.py loop / bench_step throughput{tag}",
                f"≥ {MIN_LOOP_OVER_STEP:.2f}",
                part,
                m and f"{m[1]} (range {m[2]})" + (f"; loop {rate[1]} img/s" if rate else ""),
                bool(m) and float(m[1]) >= MIN_LOOP_OVER_STEP,
            )
        )
    m = _search(
        folder, "train_n_hard", rf"^log lines with n_hard: (\d+); n_hard min ({_NUM}), max ({_NUM})"
    )
    rows.append(
        _row(
            folder,
            "200-step fp16 run: n_hard > 0 on every log line",
            "> 0",
            "train_n_hard",
            m and f"{m[2]}-{m[3]} over {m[1]} lines",
            bool(m) and int(m[1]) > 0 and float(m[2]) > 0,
        )
    )
    if (folder / "compile_r50.txt").is_file():
        m = _search(
            folder, "compile_r50", rf"^first step \(compilation included, if any\): ({_NUM}) s"
        )
        rows.append(
            _row(
                folder,
                "compiled r50 in train.py's loop: first step",
                f"< {MAX_COMPILE_S:.0f} s",
                "compile_r50",
                m and f"{m[1]} s",
                bool(m) and float(m[1]) < MAX_COMPILE_S,
            )
        )
    tests = [("tests_triton", "Triton kernels' tests, compiled for this GPU")]
    if (folder / "tests_graph.txt").is_file():
        tests.append(("tests_graph", "CUDA-graph step against eager training (GPU tests)"))
    for part, check in tests:
        counts = {
            kind: int(n)
            for n, kind in re.findall(r"(\d+) (passed|failed|errors?)\b", _read(folder, part) or "")
        }
        failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
        rows.append(
            _row(
                folder,
                check,
                "all pass",
                part,
                ", ".join(f"{n} {kind}" for kind, n in counts.items()) or None,
                counts.get("passed", 0) > 0 and failed == 0,
            )
        )
    return device, rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="gpu_check.sh's output folder")
    args = parser.parse_args(argv)
    device, rows = summarize(args.folder)
    print(f"device: {device}")
    print()
    print("| check | target | measured | verdict | log |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.check} | {r.target} | {r.measured} | {r.verdict} | {r.source}.txt |")


if __name__ == "__main__":
    main()
