"""Paired differences between any two configs of a finished ablation, from its runs' results.

    python benchmarks/ablation_pairs.py work_dirs/heads \
        demo_adaface:demo_adaface_otface demo_curricularface:demo_curricularface_otface

``python -m otface.ablate`` compares every config with the first one. This reads the same
``CONFIG/seedN/result.json`` files and prints the same table for each pair given as
``REFERENCE:OTHER`` (Δ: OTHER − REFERENCE, seed by seed), without training or evaluating
anything again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from otface.ablate.report import build_report, format_table
from otface.ablate.runner import read_result


def _results(folder: Path, label: str) -> list:
    runs = sorted((folder / label).glob("seed*"), key=lambda p: int(p.name[4:]))
    results = [r for r in (read_result(p) for p in runs) if r is not None]
    if not results:
        raise SystemExit(f"error: no finished run of {label} in {folder / label}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the ablation's --output folder")
    parser.add_argument("pairs", nargs="+", help="REFERENCE:OTHER config labels")
    args = parser.parse_args(argv)
    for pair in args.pairs:
        reference, sep, other = pair.partition(":")
        if not sep or not reference or not other:
            parser.error(f"{pair!r} is not REFERENCE:OTHER")
        results = _results(args.folder, reference) + _results(args.folder, other)
        seeds = sorted({r.seed for r in results})
        targets = {r.ijb_target for r in results}
        report = build_report(results, [reference, other], seeds, "arcface_torch")
        print(format_table(report))
        if len(targets) > 1:
            print(f"note: the runs' IJB targets differ: {sorted(map(str, targets))}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
