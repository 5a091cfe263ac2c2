"""The README's first command on a fresh machine: ``train.py`` on ``rec = "demo"`` with an empty
cache generates the demo data in the training process, then starts DataLoader workers.

With forked workers this hung forever (the parent's OpenCV/OpenMP thread pools, used by the
renderer, left locks that the forked children waited on). The run below must finish.

The training process draws a smaller demo than the shipped one (the generator's sizes are
narrowed in that process before ``train.py`` runs): the same renderer, the same thread pools
and the same cache build, in seconds instead of the full set's minute.
"""

import os
import subprocess
import sys

import pytest
from _jobs import TINY_DEMO, write_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny demo with enough training faces for 4 steps of 32: 32 identities of 4.
SMALL_DEMO = {**TINY_DEMO, "train_identities": 32, "images_per_identity": 4}
# train.py, run as the command line runs it, after the generator's sizes are narrowed.
LAUNCH = (
    "import functools, runpy, sys\n"
    "import otface.demo.generate as g\n"
    "g.generate_demo = functools.partial(g.generate_demo, **{sizes!r})\n"
    "sys.argv = [{train!r}, *sys.argv[1:]]\n"
    "runpy.run_path({train!r}, run_name='__main__')\n"
)

FIRST_RUN = {
    "network": "r18_lite",
    "rec": "demo",
    "num_classes": 32,
    "batch_size": 32,
    "num_image": 128,
    "num_epoch": 1,
    "warmup_epoch": 0,
    "frequent": 2,
    "verbose": 2,
    "val_targets": [],  # evaluation is not what hung; tests of its own cover it
    "num_workers": 2,
    "sampler": {"type": "pk", "k": 4},
}


@pytest.mark.slow
def test_demo_training_with_an_empty_cache_and_workers_finishes(tmp_path):
    out = tmp_path / "work_dirs" / "first_run"
    job = write_job(tmp_path, "first_run", {**FIRST_RUN, "output": str(out)})
    cache = tmp_path / "cache"  # empty: the run generates the demo data itself
    env = dict(os.environ, OTFACE_CACHE=str(cache))
    train = os.path.join(ROOT, "train.py")
    cmd = [sys.executable, "-c", LAUNCH.format(sizes=SMALL_DEMO, train=train), job]
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
