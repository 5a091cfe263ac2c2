"""benchmarks/gpu_summary.py: the GPU targets read back from gpu_check.sh's part logs.

The step tables are printed here by bench_step's own printer from block times chosen so that
every ratio is known by hand; the other logs are the lines the benchmarks print, with
hand-picked values.
"""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_step  # noqa: E402
import gpu_summary  # noqa: E402


def _step_table(block_s, *, first_s, n_hard=None, channels_last=True) -> str:
    result = bench_step.Interleaved(
        block_s=block_s,
        n_hard={name: (n_hard or {}).get(name, []) for name in block_s},
        first_s=first_s,
    )
    layouts = {name: (channels_last and name != "upstream") for name in block_s}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print("device: NVIDIA H200; network r100, batch 128")
        bench_step._print_comparison(result, layouts, "upstream")
    return buf.getvalue()


def _rows(folder):
    device, rows = gpu_summary.summarize(folder)
    return device, {r.check: r for r in rows}


def test_step_ratios_are_judged_per_network_and_only_for_the_arcface_rows(tmp_path):
    # r100: upstream 0.100 s per block; arcface 0.058 / 0.059 / 0.062 -> ratios 0.58, 0.59,
    # 0.62, median 0.59 (met, <= 0.60); otface 0.070 -> 0.70 (no target); compiled arcface
    # 0.050 -> 0.50 with its first step of 75.5 s.
    up = [0.100, 0.100, 0.100]
    (tmp_path / "vs_upstream_r100.txt").write_text(
        _step_table(
            {
                "upstream": up,
                "arcface": [0.058, 0.059, 0.062],
                "otface": [0.070, 0.070, 0.070],
                "arcface+default": [0.050, 0.050, 0.050],
            },
            first_s={"upstream": 4.0, "arcface": 2.5, "otface": 2.6, "arcface+default": 75.5},
            n_hard={"otface": [90.0, 100.0]},
        )
    )
    # r50: arcface 0.063 over upstream 0.100 -> 0.63, missed (<= 0.50); fused 0.049 -> met.
    (tmp_path / "vs_upstream_r50.txt").write_text(
        _step_table(
            {"upstream": up, "arcface": [0.063] * 3, "arcface+fused": [0.049] * 3},
            first_s={"upstream": 3.0, "arcface": 2.0, "arcface+fused": 2.2},
        )
    )
    (tmp_path / "env.txt").write_text("2.11.0+cu130 NVIDIA H200\n")
    device, rows = _rows(tmp_path)
    assert device == "2.11.0+cu130 NVIDIA H200"

    r = rows["our `arcface` / upstream step, r100"]
    assert r.verdict == "met" and r.target == "≤ 0.60"
    assert r.measured.startswith("0.590 [IQR 0.585-0.605] (59.0 vs 100.0 ms)")
    r = rows["our `otface` / upstream step, r100"]
    assert (r.verdict, r.target) == ("-", "-") and r.measured.startswith("0.700")
    r = rows["our `arcface+default` / upstream step, r100"]
    assert r.verdict == "met" and r.measured.endswith("; first step 75.5 s")
    r = rows["our `arcface` / upstream step, r50"]
    assert (r.verdict, r.target) == ("missed", "≤ 0.50") and r.measured.startswith("0.630")
    r = rows["our `arcface+fused` / upstream step, r50"]
    assert r.verdict == "met" and "first step" not in r.measured


def test_vit_step_rows_are_listed_without_a_target(tmp_path):
    # vit_t: arcface 0.080 and otface 0.120 over upstream 0.100 -> 0.80 and 1.20, no target;
    # vit_b's part failed before its table: "not measured", never met.
    (tmp_path / "vs_upstream_vit_t.txt").write_text(
        _step_table(
            {"upstream": [0.100] * 3, "arcface": [0.080] * 3, "otface": [0.120] * 3},
            first_s={"upstream": 1.0, "arcface": 1.0, "otface": 1.1},
            channels_last=False,
        )
    )
    (tmp_path / "vs_upstream_vit_b.txt").write_text("Traceback ...\n")
    (tmp_path / "vs_upstream_vit_b.rc").write_text("1\n")
    _, rows = _rows(tmp_path)
    r = rows["our `arcface` / upstream step, vit_t"]
    assert (r.target, r.verdict) == ("-", "-") and r.measured.startswith("0.800 [IQR")
    assert rows["our `otface` / upstream step, vit_t"].measured.startswith("1.200")
    r = rows["our `arcface` / upstream step, vit_b"]
    assert r.verdict == "not measured (part failed, exit 1)"
    # The targeted networks still show, as not run.
    assert rows["our `arcface` / upstream step, r50"].verdict == "not measured (part not run)"


def test_other_targets_from_their_lines(tmp_path):
    (tmp_path / "sync_debug.txt").write_text(
        "device: NVIDIA H200\nhost syncs in one otface step: 2\n"
        "    1 x _local_scalar_dense     plugin/otface/train/optim.py:81\n"
    )
    (tmp_path / "loop_vs_step.txt").write_text(
        "first step (compilation included, if any): 3.1 s\n"
        "loop / step throughput: median 0.962 (range 0.941-0.977 over 4 paired blocks; "
        "target >= 0.95)\n"
    )
    (tmp_path / "train_n_hard.txt").write_text(
        "log lines with n_hard: 9; n_hard min 0.0, max 116.6\n"
    )
    (tmp_path / "compile_r50.txt").write_text(
        "first step (compilation included, if any): 131.0 s\n"
    )
    (tmp_path / "tests_triton.txt").write_text("....\n2 failed, 27 passed in 40.1s\n")
    (tmp_path / "loop_graph.txt").write_text(
        "mode    img/s (median)       min       max\nstep 4100.0 4000.0 4200.0\n"
        "loop            3690.5    3600.0    3700.0\n"
        "loop / step throughput: median 0.900 (range 0.880-0.930 over 4 paired blocks; "
        "target >= 0.95)\n"
    )
    (tmp_path / "tests_graph.txt").write_text("......\n6 passed in 30.0s\n")
    _, rows = _rows(tmp_path)
    assert rows["train.py loop / bench_step throughput, cuda_graph on"][2:4] == (
        "0.900 (range 0.880-0.930); loop 3690.5 img/s",
        "missed",
    )
    assert rows["CUDA-graph step against eager training (GPU tests)"][2:4] == ("6 passed", "met")
    assert rows["host syncs in one fp16 `otface` step"][2:4] == ("2", "missed")
    assert rows["train.py loop / bench_step throughput"][2:4] == (
        "0.962 (range 0.941-0.977)",
        "met",
    )
    # One log line with n_hard 0 is enough to miss.
    assert rows["200-step fp16 run: n_hard > 0 on every log line"].verdict == "missed"
    assert rows["compiled r50 in train.py's loop: first step"][2:4] == ("131.0 s", "missed")
    assert rows["Triton kernels' tests, compiled for this GPU"][2:4] == (
        "2 failed, 27 passed",
        "missed",
    )


def test_what_did_not_run_or_failed_is_never_met(tmp_path):
    # sync_debug hit its time limit before printing a count; the loop part failed; the step
    # comparisons and the training run never ran; compile_r50 (an EXTRA part) did not run.
    (tmp_path / "sync_debug.txt").write_text("device: NVIDIA H200\n")
    (tmp_path / "sync_debug.rc").write_text("124\n")
    (tmp_path / "loop_vs_step.txt").write_text("Traceback (most recent call last):\n")
    (tmp_path / "loop_vs_step.rc").write_text("1\n")
    (tmp_path / "tests_triton.txt").write_text("")
    (tmp_path / "tests_triton.rc").write_text("0\n")
    device, rows = _rows(tmp_path)
    assert device == "unknown"
    verdicts = {name: r.verdict for name, r in rows.items()}
    assert verdicts == {
        "our `arcface` / upstream step, r100": "not measured (part not run)",
        "our `arcface` / upstream step, r50": "not measured (part not run)",
        "host syncs in one fp16 `otface` step": "not measured (part hit its time limit)",
        "train.py loop / bench_step throughput": "not measured (part failed, exit 1)",
        "200-step fp16 run: n_hard > 0 on every log line": "not measured (part not run)",
        "Triton kernels' tests, compiled for this GPU": "not measured (no result in the log)",
    }
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gpu_summary.main([str(tmp_path)])
    table = out.getvalue().splitlines()
    assert table[0] == "device: unknown"
    assert table[2] == "| check | target | measured | verdict | log |"
    assert len(table) == 4 + len(verdicts)


@pytest.mark.slow
def test_gpu_check_keeps_to_its_budget_and_still_writes_the_summary(tmp_path):
    # Every part's python is a stand-in that takes 3 s; gpu_summary.py runs for real. With
    # BUDGET_S=50 (15 s kept for the summary) the first part starts with 35 s left, and once
    # fewer than 30 s are left the remaining parts are skipped, not started.
    shim = tmp_path / "bin" / "python"
    shim.parent.mkdir()
    shim.write_text(
        "#!/bin/sh\n"
        'case "$1" in *gpu_summary.py) exec "$REAL_PYTHON" "$@";; esac\n'
        "sleep 3\necho stand-in part\n"
    )
    shim.chmod(0o755)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{shim.parent}:{os.environ['PATH']}",
        "REAL_PYTHON": sys.executable,
        "OUT": str(out),
        "BUDGET_S": "50",
        "ARCFACE_TORCH": "",
    }
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "env.rc").read_text().strip() == "0"
    assert (out / "tests_triton.rc").read_text().strip() == "budget"
    assert "== tests_triton: skipped" in proc.stdout
    summary = (out / "summary.md").read_text()
    assert (
        "| Triton kernels' tests, compiled for this GPU | all pass | - | not measured "
        "(skipped: BUDGET_S spent) |" in summary
    )
    assert (out / "train.rc").read_text().strip() == "budget"  # its rm -rf never ran either
