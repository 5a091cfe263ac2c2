"""GOMP_SPINCOUNT is set for training before torch loads OpenMP, unless the user chose."""

import os
import subprocess
import sys

from otface.openmp import SPINCOUNT, configure_openmp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configure_openmp_sets_a_default_and_keeps_a_users_choice():
    env = {}
    configure_openmp(env)
    assert env == {"GOMP_SPINCOUNT": SPINCOUNT}
    env = {"GOMP_SPINCOUNT": "5"}
    configure_openmp(env)
    assert env == {"GOMP_SPINCOUNT": "5"}
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    configure_openmp(env)
    assert "GOMP_SPINCOUNT" not in env


def test_train_py_sets_it_before_torch_is_imported():
    # train.py as the command line runs it, stopped right after its imports.
    code = (
        "import runpy, sys; sys.argv = ['train.py', '--help']\n"
        "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "import os; print('SPIN', os.environ.get('GOMP_SPINCOUNT'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert f"SPIN {SPINCOUNT}" in done.stdout, done.stderr
    text = open(os.path.join(ROOT, "train.py")).read()
    assert text.index("configure_openmp()") < text.index("from otface.train import main")
