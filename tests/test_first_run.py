"""The README's first command on a fresh machine: ``train.py`` on ``rec = "demo"`` with an empty
cache generates the demo data in the training process, then starts DataLoader workers.

With forked workers this hung forever (the parent's OpenCV/OpenMP thread pools, used by the
renderer, left locks that the forked children waited on). The run below must finish.
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIRST_RUN = """
from easydict import EasyDict as edict
config = edict()
config.network = "r18_lite"
config.rec = "demo"
config.num_classes = 256
config.batch_size = 32
config.num_image = 128
config.num_epoch = 1
config.warmup_epoch = 0
config.frequent = 2
config.verbose = 2
config.val_targets = ["demo_lfw"]
config.num_workers = 2
config.sampler = edict(type="pk", k=4)
config.output = {output!r}
"""


@pytest.mark.slow
def test_demo_training_with_an_empty_cache_and_workers_finishes(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(os.path.join(ROOT, "configs", "base.py"), configs / "base.py")
    out = tmp_path / "work_dirs" / "first_run"
    (configs / "first_run.py").write_text(FIRST_RUN.format(output=str(out)))
    cache = tmp_path / "cache"  # empty: the run generates the demo data itself
    env = dict(os.environ, OTFACE_CACHE=str(cache))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), str(configs / "first_run")]
    try:
        done = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-2000:]
        pytest.fail(f"train.py did not finish within 300 s (first-run hang); log tail:\n{tail}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(cache.glob("demo_v*_seed0/.complete")), "the demo data was not generated"
    log = (out / "training.log").read_text()
    assert "finished: 4 steps" in log
    assert "[demo_lfw][4]Accuracy-Flip" in log
