"""A rank that dies mid-run: the ranks left get one ``error:`` line naming what happened and
how to resume, and exit code 1, instead of gloo's raw traceback (two ranks, gloo, CPU)."""

from __future__ import annotations

import contextlib
import io
import os

import torch.multiprocessing as mp
from _spawn import free_port

CONFIG = """
from easydict import EasyDict as edict
config = edict()
config.network = "r18_lite"
config.rec = "synthetic"
config.num_classes = 16
config.batch_size = 8
config.num_image = 160
config.num_epoch = 1
config.lr = 0.05
config.frequent = 2
config.verbose = 100000
config.val_targets = []
config.num_workers = 0
config.save_every_steps = 2
config.collective_timeout_s = 60
config.sampler = edict(type="pk", k=2)
config.output = {output!r}
"""

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


def test_a_dead_rank_is_one_error_line_on_the_others(tmp_path):
    path = tmp_path / "lost_peer.py"
    output = tmp_path / "out"
    path.write_text(CONFIG.format(output=str(output)))
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
    assert "rank 0: a collective failed because another rank of the job died" in errors[0]
    # Rank 0 saved at step 2 before rank 1 died in step 4: the line names that checkpoint.
    assert str(output / "checkpoint_gpu_0.pt") in errors[0], errors[0]
    assert "resume = True" in errors[0]
    log = (output / "training.log").read_text()
    assert errors[0] in log
