"""Tests for otface.ablate: statistics by hand, overrides, resume-by-skip, the table, the CLI.

References: paired differences and t-intervals computed by hand (the t quantile from a printed
table), configs loaded by otface.config, and a run log written by the test.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from otface.ablate.plan import (
    frozen_config_text,
    make_arms,
    parse_override,
    plan_runs,
    write_frozen_config,
)
from otface.ablate.report import build_report, format_table, write_outputs
from otface.ablate.runner import (
    AblationError,
    EvalSpec,
    RunResult,
    read_result,
    run_all,
    training_curve,
)
from otface.ablate.stats import paired_difference, summarize
from otface.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
T_975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom
CONFIGS = [str(REPO / "configs" / "demo_arcface"), str(REPO / "configs" / "demo_otface")]


def test_paired_difference_by_hand():
    a = [0.90, 0.92, 0.91]
    b = [0.93, 0.94, 0.92]  # differences 0.03, 0.02, 0.01: mean 0.02, sample sd 0.01
    d = paired_difference(a, b)
    half = T_975_DF2 * 0.01 / math.sqrt(3)  # 0.024841...
    assert d.n == 3 and d.mean == pytest.approx(0.02)
    assert (d.low, d.high) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert half == pytest.approx(0.0248414, abs=1e-7)
    # A missing seed drops its pair: differences 0.03, 0.01 → mean 0.02, sd sqrt(2)/100,
    # t(0.975, 1) = 12.7062047...
    d2 = paired_difference([0.90, np.nan, 0.91], [0.93, 0.94, 0.92])
    assert d2.n == 2 and d2.mean == pytest.approx(0.02)
    assert d2.high - d2.mean == pytest.approx(12.706204736 * (math.sqrt(2) / 100) / math.sqrt(2))
    one = paired_difference([0.5], [0.6])
    assert one.mean == pytest.approx(0.1) and math.isnan(one.low) and math.isnan(one.high)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1, 2], [1])


def test_detectable_difference_by_hand_and_by_the_power_it_promises():
    # Differences 0.03, 0.02, 0.01: sd 0.01, n 3. With 2 degrees of freedom the t CDF is
    # 1/2 + t / (2 sqrt(2 + t^2)), so t(0.8, 2) = sqrt(1.125) exactly.
    d = paired_difference([0.90, 0.92, 0.91], [0.93, 0.94, 0.92])
    expected = (T_975_DF2 + math.sqrt(1.125)) * 0.01 / math.sqrt(3)
    assert d.detectable == pytest.approx(expected, rel=1e-9) and d.power == 0.8
    assert math.isnan(paired_difference([0.5], [0.6]).detectable)
    # With 10 seeds, a true difference equal to the detectable one is found (two-sided paired
    # t-test at 5%) with probability close to 80%: the non-central t distribution says so.
    from scipy.stats import nct
    from scipy.stats import t as student_t

    rng = np.random.default_rng(0)
    a = rng.normal(0.9, 0.01, 10)
    b = a + rng.normal(0.0, 0.004, 10)
    d10 = paired_difference(a, b)
    se = (d10.high - d10.mean) / student_t.ppf(0.975, 9)
    crit = student_t.ppf(0.975, 9)
    shift = d10.detectable / se
    power = nct.sf(crit, 9, shift) + nct.cdf(-crit, 9, shift)
    assert 0.78 < power < 0.82
    with pytest.raises(ValueError, match="power"):
        paired_difference([1, 2], [1, 3], power=1.0)


def test_summarize_by_hand():
    s = summarize([0.90, 0.92, 0.94])
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.92), pytest.approx(0.02))
    assert math.isnan(summarize([0.5]).std) and summarize([]).n == 0


def test_overrides_and_arms():
    o = parse_override("otface.distance=entropic")
    assert (o.key, o.value, o.arm) == ("otface.distance", "entropic", None)
    assert parse_override("2:margin_list=(1.0, 0.0, 0.4)").value == (1.0, 0.0, 0.4)
    assert parse_override("lr=0.05").value == 0.05
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("lr")
    arms = make_arms([CONFIGS[1], CONFIGS[1]], [parse_override("2:otface.distance=entropic")])
    assert [a.label for a in arms] == ["demo_otface", "demo_otface+otface.distance=entropic"]
    with pytest.raises(ValueError, match="listed twice"):
        make_arms([CONFIGS[1], CONFIGS[1]], [])
    with pytest.raises(ValueError, match="names config 3"):
        make_arms(CONFIGS, [parse_override("3:lr=0.1")])


def test_plan_applies_and_validates_overrides(tmp_path):
    overrides = [parse_override("lr=0.05"), parse_override("2:otface.distance=entropic")]
    arms = make_arms(CONFIGS, overrides)
    runs = plan_runs(arms, [7, 8], tmp_path, shared=overrides[:1], epochs=2)
    assert [(r.arm.label, r.seed) for r in runs] == [
        ("demo_arcface", 7),
        ("demo_otface+otface.distance=entropic", 7),
        ("demo_arcface", 8),
        ("demo_otface+otface.distance=entropic", 8),
    ]
    cfg = runs[1].cfg
    assert (cfg.lr, cfg.otface.distance, cfg.num_epoch, cfg.seed) == (0.05, "entropic", 2, 7)
    assert cfg.output == str(tmp_path / "demo_otface+otface.distance=entropic" / "seed7")
    assert runs[0].digest != runs[2].digest  # the seed is part of the config
    # The frozen file is complete: read without base.py it gives the same config back.
    path = write_frozen_config(runs[1], resume=True)
    again = load_config(path, base=path)
    assert again.resume is True and again.margin_list == cfg.margin_list
    assert frozen_config_text(again) == frozen_config_text(cfg)
    for bad, match in [
        ("otface.distanse=entropic", "otface.distanse"),
        ("lr=fast", "'lr'"),
        ("nosuch.key=1", "'nosuch' is not a config section"),
    ]:
        with pytest.raises(ConfigError, match=match):
            plan_runs(arms, [1], tmp_path, shared=[parse_override(bad)])


def test_training_curve_from_log(tmp_path):
    log = tmp_path / "training.log"
    log.write_text(
        "Training: 2026-01-01 00:00:00,000-[demo_lfw][64]Accuracy-Flip: 0.81000+-0.02000\n"
        "Training: 2026-01-01 00:00:01,000-[demo_lfw][64]Accuracy-Highest: 0.81000\n"
        "Training: 2026-01-01 00:00:02,000-[demo_lfw][128]Accuracy-Flip: 0.85000+-0.01000\n"
        "Training: 2026-01-01 00:00:03,000-[demo_lfw][128]Accuracy-Flip: 0.86000+-0.01000\n"
    )
    assert training_curve(log) == {"demo_lfw": [(64, 0.81), (128, 0.86)]}


def _fake_eval(run, spec):
    # A metric that depends on the config and the seed, known in advance.
    bonus = 0.01 if run.arm.label.startswith("demo_otface") else 0.0
    return RunResult(
        run.arm.label,
        run.seed,
        run.digest,
        0.0,
        verification={"demo_lfw": 0.9 + bonus + 0.001 * run.seed},
        fars=[1e-3],
        tars=[0.5 + 2 * bonus],
    )


def test_resume_by_skip(tmp_path):
    arms = make_arms(CONFIGS, [])
    runs = plan_runs(arms, [1, 2], tmp_path)
    spec = EvalSpec(bin_sets=(), ijb=None)
    calls = []

    def train_then_die(run, resume):
        calls.append((run.arm.label, run.seed, resume))
        if len(calls) == 3:  # killed during the third run's training
            run.folder.mkdir(parents=True, exist_ok=True)
            (run.folder / "checkpoint_gpu_0.pt").write_bytes(b"epoch 1")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_all(runs, spec, train=train_then_die, evaluate=_fake_eval, progress=lambda s: None)
    assert [read_result(r.folder) is not None for r in runs] == [True, True, False, False]

    calls.clear()
    lines = []
    results = run_all(
        runs,
        spec,
        train=lambda run, resume: calls.append((run.arm.label, run.seed, resume)),
        evaluate=_fake_eval,
        progress=lines.append,
    )
    # Only the unfinished runs train again; the killed one resumes from its checkpoint.
    assert calls == [("demo_arcface", 2, True), ("demo_otface", 2, False)]
    assert [(r.label, r.seed) for r in results] == [(r.arm.label, r.seed) for r in runs]
    assert "finished earlier, skipped" in lines[0] and "run 3/4: demo_arcface seed 2" in lines[2]
    assert "ETA 0:00:00" in lines[2]  # the fake runs take no time

    calls.clear()
    run_all(runs, spec, train=lambda *a: calls.append(a), evaluate=_fake_eval, progress=print)
    assert calls == []  # everything finished: nothing runs

    changed = plan_runs(arms, [1], tmp_path, shared=[parse_override("lr=0.2")])
    with pytest.raises(AblationError, match="another config"):
        run_all(changed, spec, train=lambda *a: None, evaluate=_fake_eval, progress=print)


def test_report_table_and_files(tmp_path):
    arms = make_arms(CONFIGS, [])
    runs = plan_runs(arms, [1, 2, 3], tmp_path)
    results = [_fake_eval(r, None) for r in runs]
    results[0].curve = {"demo_lfw": [(64, 0.8), (128, 0.9)]}
    report = build_report(results, [a.label for a in arms], [1, 2, 3], "arcface_torch")
    assert report.metrics == ["demo_lfw", "TAR@1e-3"]
    row = next(r for r in report.rows if r.label == "demo_otface" and r.metric == "demo_lfw")
    # Per-seed differences are all exactly 0.01: mean 0.01, zero-width interval.
    assert row.difference.mean == pytest.approx(0.01)
    assert row.difference.high == pytest.approx(0.01)
    ref = next(r for r in report.rows if r.label == "demo_arcface" and r.metric == "demo_lfw")
    assert ref.summary.mean == pytest.approx(0.902) and ref.summary.std == pytest.approx(0.001)
    table = format_table(report)
    assert "90.20 ± 0.10" in table and "+1.00 [+1.00, +1.00]" in table
    assert "+2.00 [+2.00, +2.00]" in table  # TAR 0.52 against 0.50 on every seed
    folders = {(r.arm.label, r.seed): r.folder for r in runs}
    written = write_outputs(tmp_path / "out", report, results, folders)
    data = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert data["configs"] == ["demo_arcface", "demo_otface"] and len(data["runs"]) == 6
    csv_lines = (tmp_path / "out" / "ablation.csv").read_text().splitlines()
    assert csv_lines[0].startswith("config,metric,n_seeds,mean,std,diff_mean")
    assert len(csv_lines) == 1 + 2 * 2
    assert (tmp_path / "out" / "ablation.txt").read_text().startswith("+")
    if any(p.suffix == ".png" for p in written):
        assert (tmp_path / "out" / "ablation.png").stat().st_size > 1000


@pytest.mark.slow
def test_cli_end_to_end_on_tiny_data(tmp_path, capsys, tiny_demo):
    from otface.ablate.__main__ import main

    data = tiny_demo
    out = tmp_path / "ablation"
    argv = [*CONFIGS, "--seeds", "1", "--epochs", "1", "--output", str(out)]
    for o in [f"rec={data}", "num_classes=8", "num_image=32", "batch_size=16", "num_workers=0"]:
        argv += ["--set", o]
    assert main(argv + ["--ijb-target", "demo"]) == 0
    first = capsys.readouterr().out
    assert "run 1/2: demo_arcface seed 2048" in first and "run 2/2: demo_otface" in first
    assert "Δ vs demo_arcface" in first and "TAR@1e-3" in first
    result = read_result(out / "demo_otface" / "seed2048")
    assert set(result.verification) == {"demo_lfw", "demo_hard", "demo_mask", "demo_crop"}
    assert result.ijb_target == "demo"
    assert result.curve["demo_lfw"][-1][0] == 2  # verified at the last of 2 steps
    assert main(argv) == 0  # again: both runs are skipped
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    assert main(argv + ["--set", "nosuch=1"]) == 2
    assert "unknown key 'nosuch'" in capsys.readouterr().err


def test_fine_tuning_both_ways_from_one_model(tmp_path):
    """--set init_backbone=... gives every arm the same starting model."""
    start = str(tmp_path / "start" / "model.pt")
    override = parse_override(f"init_backbone={start}")
    arms = make_arms(CONFIGS, [override])
    runs = plan_runs(arms, [1], tmp_path / "out", shared=[override], epochs=2)
    assert [r.cfg.init_backbone for r in runs] == [start, start]
    assert [r.cfg.loss for r in runs] == ["arcface", "otface"]
    again = load_config(write_frozen_config(runs[1], resume=False), base=None)
    assert again.init_backbone == start
