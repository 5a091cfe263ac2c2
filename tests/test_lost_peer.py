"""A rank that dies mid-run: the ranks left get one ``error:`` line naming what happened and
how to resume, and exit code 1, instead of gloo's raw traceback (two ranks, gloo, CPU)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch.multiprocessing as mp
from _jobs import TINY_RUN, job_source
from _spawn import TRAIN_PY, free_port

CONFIG = {
    **TINY_RUN,
    "num_classes": 16,
    "num_image": 160,
    "num_epoch": 1,
    "save_every_steps": 2,
    "collective_timeout_s": 60,
    "sampler": {"type": "pk", "k": 2},
}

DIES_AT_STEP = 4


def _rank(rank: int, port: int, path: str, results) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    from otface.train import loop, run

    original = loop.Trainer.train_step

    def step(self, img, labels):
        if rank == 1 and self.global_step + 1 == DIES_AT_STEP:
            os._exit(17)  # as a killed node: no exception, no goodbye to the others
        return original(self, img, labels)

    loop.Trainer.train_step = step
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run.main(path)
    results.put((rank, code, err.getvalue()))


@pytest.mark.slow
def test_a_dead_rank_is_one_error_line_on_the_others(tmp_path):
    path = tmp_path / "lost_peer.py"
    output = tmp_path / "out"
    path.write_text(job_source({**CONFIG, "output": str(output)}))
    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, str(path), results)) for r in (0, 1)]
    for p in procs:
        p.start()
    rank, code, stderr = results.get(timeout=240)
    for p in procs:
        p.join(timeout=60)
    assert procs[1].exitcode == 17
    assert rank == 0
    assert code == 1, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert "rank 0: a collective failed at global step " in errors[0]
    assert "because another rank of the job died" in errors[0]
    # Rank 0 saved at step 2 before rank 1 died in step 4: the line names that checkpoint.
    assert str(output / "checkpoint_gpu_0.pt") in errors[0], errors[0]
    assert errors[0].endswith(
        f"; to continue: torchrun --nproc_per_node=2 train.py {path} --resume"
    )
    log = (output / "training.log").read_text()
    assert errors[0] in log


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_under_torchrun_reads_as_a_lost_rank(tmp_path, victim):
    # torchrun stops the other rank with SIGTERM when one dies; whichever rank is killed, the
    # survivor says a rank died (not that someone stopped the job) and exits with 1, not -15.
    path = tmp_path / "under_torchrun.py"
    output = tmp_path / "out"
    path.write_text(job_source({**CONFIG, "num_image": 8 * 3000, "output": str(output)}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_port", str(free_port()), TRAIN_PY, str(path),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    deadline = time.time() + 120
    while not (output / "checkpoint_gpu_0.pt").exists() and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    killed = None
    for pid in _children(proc.pid):
        if _environ(pid).get("RANK") == str(victim):
            os.kill(pid, signal.SIGKILL)
            killed = pid
    assert killed is not None
    out, _ = proc.communicate(timeout=180)
    survivor = 1 - victim
    errors = [line for line in out.splitlines() if line.startswith(f"error: rank {survivor}")]
    assert len(errors) == 1, out[-4000:]
    assert "died" in errors[0] and "interrupted" not in out, errors[0]
    codes = {int(p): int(c) for c, p in re.findall(r"exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)", out)}
    others = [code for pid, code in codes.items() if pid != killed]
    assert others == [1], out[-3000:]


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (torchrun's agent and its workers)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                kids = []
            found += kids
            todo += kids
    return found


def _environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)
