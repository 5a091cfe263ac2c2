"""benchmarks/ablation_pairs.py: any two configs of an ablation folder, paired by seed."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablation_pairs  # noqa: E402


def _result(folder: Path, label: str, seed: int, lfw: float) -> None:
    run = folder / label / f"seed{seed}"
    run.mkdir(parents=True)
    data = {"label": label, "seed": seed, "digest": "d", "seconds": 1.0,
            "verification": {"demo_lfw": lfw}}  # fmt: skip
    (run / "result.json").write_text(json.dumps(data))


def test_the_difference_is_taken_seed_by_seed(tmp_path, capsys):
    # Seeds 1..3: a = 0.90, 0.92, 0.94; b = 0.91, 0.94, 0.97: differences 1, 2, 3 points.
    for seed, (a, b) in enumerate([(0.90, 0.91), (0.92, 0.94), (0.94, 0.97)], start=1):
        _result(tmp_path, "a", seed, a)
        _result(tmp_path, "b", seed, b)
    assert ablation_pairs.main([str(tmp_path), "a:b"]) == 0
    out = capsys.readouterr().out
    # Mean 2.00, sd 1, n 3: t(0.975, 2) = 4.303, half-width 4.303 / sqrt(3) = 2.48.
    row = next(line for line in out.splitlines() if "Δ vs a" in line)
    assert "+2.00 [-0.48, +4.48]" in row, out


def test_a_config_without_runs_is_named(tmp_path):
    _result(tmp_path, "a", 1, 0.9)
    with pytest.raises(SystemExit, match="no finished run of b"):
        ablation_pairs.main([str(tmp_path), "a:b"])
