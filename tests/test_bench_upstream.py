"""benchmarks/bench_step.py --arcface-torch: arcface_torch's step timed beside ours.

The end-to-end test needs an arcface_torch checkout, named by the ARCFACE_TORCH environment
variable (the folder of its train_v2.py); without it, it is skipped.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_step  # noqa: E402

CHECKOUT = os.environ.get("ARCFACE_TORCH")


def test_spread_quartiles_and_range():
    s = bench_step.spread([5.0, 1.0, 4.0, 2.0, 3.0])
    assert s == bench_step.Spread(median=3.0, q1=2.0, q3=4.0, lo=1.0, hi=5.0, n=5)
    # Four values: quartiles interpolated between neighbours (numpy's default).
    s = bench_step.spread([1.0, 2.0, 3.0, 5.0])
    assert (s.median, s.q1, s.q3) == (2.5, 1.75, 3.5)
    assert bench_step.spread([7.0]) == bench_step.Spread(7.0, 7.0, 7.0, 7.0, 7.0, 1)
    with pytest.raises(ValueError, match="no values"):
        bench_step.spread([])


def test_paired_ratios_pair_blocks_of_the_same_round():
    # Round 1 was slow for everyone: paired ratios stay near 0.5 and 1.5 although the
    # unpaired times of "a" (10..40) overlap those of "up" (20..40) and "b" (30..60).
    block_s = {"up": [20.0, 40.0, 20.0], "a": [10.0, 20.0, 11.0], "b": [30.0, 60.0, 28.0]}
    ratios = bench_step.paired_ratios(block_s, "up")
    assert set(ratios) == {"a", "b"}
    assert ratios["a"] == [0.5, 0.5, 0.55]
    assert ratios["b"] == [1.5, 1.5, 1.4]
    assert bench_step.spread(ratios["a"]).median == 0.5
    assert bench_step.spread(ratios["b"]).median == 1.5


def test_paired_ratios_errors_name_the_problem():
    with pytest.raises(ValueError, match="'up' is not a contender"):
        bench_step.paired_ratios({"a": [1.0]}, "up")
    with pytest.raises(ValueError, match="a has 1 blocks, up has 2"):
        bench_step.paired_ratios({"up": [1.0, 2.0], "a": [1.0]}, "up")


def test_interleave_rotates_the_order_and_feeds_every_contender_the_same_batches():
    calls = []

    def contender(name):
        def step(x, labels, number):
            calls.append((name, x, number))

        return step

    batches = [(i, None) for i in range(1 + 3 * 2)]
    args = type("Args", (), {"warmup": 1, "blocks": 3, "block_steps": 2})()
    contenders = {name: (contender(name), batches) for name in "ABC"}
    result = bench_step.interleave(contenders, args, bench_step.torch.device("cpu"))
    order = [name for name, _, _ in calls]
    assert order[:3] == ["A", "B", "C"]  # warm-up
    blocks = order[3::2]
    assert blocks == list("ABC") + list("BCA") + list("CAB")
    for name in "ABC":
        assert [x for n, x, _ in calls if n == name] == list(range(7))
        assert [k for n, _, k in calls if n == name] == list(range(1, 8))
        assert len(result.block_s[name]) == 3


def test_bad_checkout_names_the_path_and_the_missing_files(tmp_path):
    from _upstream import load_arcface_torch

    (tmp_path / "losses.py").write_text("")
    with pytest.raises(FileNotFoundError) as err:
        load_arcface_torch(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    assert "backbones/__init__.py" in str(err.value) and "partial_fc_v2.py" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_arcface_torch(str(tmp_path / "absent"))


def test_timm_stand_in_drops_paths_as_timm_and_leaves_nothing_behind():
    import importlib.util

    import torch
    from _upstream import _timm_stand_in

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed: the stand-in is not used")
    with _timm_stand_in() as used:
        assert used
        from timm.models.layers import DropPath, to_2tuple, trunc_normal_

        assert to_2tuple(9) == (9, 9) and trunc_normal_ is torch.nn.init.trunc_normal_
    assert not any(name == "timm" or name.startswith("timm.") for name in sys.modules)
    # timm's stochastic depth: per sample, all or nothing, kept ones scaled by 1 / keep.
    layer = DropPath(0.25).train()
    torch.manual_seed(0)
    out = layer(torch.ones(4000, 3, 2))
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    x = torch.randn(5, 3)
    assert torch.equal(layer.eval()(x), x)


@pytest.mark.slow
@pytest.mark.skipif(not CHECKOUT, reason="set ARCFACE_TORCH to an arcface_torch checkout")
@pytest.mark.parametrize("network", ["mbf", "vit_t"])
def test_side_by_side_with_upstream_on_cpu(network):
    # mbf: upstream's smallest network, a few seconds on one CPU thread; vit_t: its ViT, with
    # timm's helpers from the stand-in where timm is missing.
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_step.py"),
        "--arcface-torch",
        CHECKOUT,
        "--device",
        "cpu",
        "--network",
        network,
        "--batch-size",
        "4",
        "--k",
        "2",
        "--num-classes",
        "50",
        "--warmup",
        "0",
        "--blocks",
        "2",
        "--block-steps",
        "1",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "plugin"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in ("upstream", "arcface", "otface") and parts[1] == "NCHW":
            rows[parts[0]] = parts
    assert set(rows) == {"upstream", "arcface", "otface"}, proc.stdout
    assert "starts from our initial weights" in proc.stdout
    for name in ("arcface", "otface"):
        step_ms, ratio = float(rows[name][2]), float(rows[name][5])
        assert step_ms > 0 and math.isfinite(step_ms)
        assert ratio > 0 and math.isfinite(ratio)
