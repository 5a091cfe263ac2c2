"""Multi-node through torchrun itself: two node processes of 2 ranks each on localhost (gloo,
CPU), a tiny network, a few steps."""

import json
import os
import subprocess
import sys

import pytest
import torch
from _spawn import free_port
from test_train_reliability import _config

from otface.config import load_config
from otface.data.sampler import PKBatchSampler
from otface.data.synthetic import synthetic_labels
from otface.train.checkpoint import checkpoint_path

HERE = os.path.dirname(os.path.abspath(__file__))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _node(node_rank, port, path, record_dir):
    cmd = (
        [TORCHRUN] if os.path.exists(TORCHRUN) else [sys.executable, "-m", "torch.distributed.run"]
    )
    cmd += [
        "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(node_rank),
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        os.path.join(HERE, "torchrun_record.py"), path, record_dir,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


@pytest.mark.slow
def test_two_nodes_of_two_ranks_train_as_one_job(tmp_path):
    # 4 ranks x batch 8 = 32 images a step, 3 steps; P x K with 4 identities of 2 images a rank.
    path, out = _config(tmp_path, num_classes=24, num_image=96, num_epoch=1)
    port = free_port()
    nodes = [_node(n, port, path, str(tmp_path)) for n in (0, 1)]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-3000:]

    records = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(4)]
    assert [(r["env"]["GROUP_RANK"], r["env"]["LOCAL_RANK"]) for r in records] == [
        ("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")
    ]  # fmt: skip
    assert {r["env"]["WORLD_SIZE"] for r in records} == {"4"}

    # Every rank dealt its own share of each step: no image and no identity on two ranks.
    seed = load_config(path).seed
    labels = synthetic_labels(96, 24, seed=seed)
    assert all(len(r["batches"]) == 3 for r in records)
    for step in range(3):
        batches = [r["batches"][step] for r in records]
        assert {tuple(b[:2]) for b in batches} == {(0, step)}
        images = [set(b[2]) for b in batches]
        identities = [set(labels[sorted(i)].tolist()) for i in images]
        assert sum(map(len, images)) == len(set().union(*images)) == 32
        assert sum(map(len, identities)) == len(set().union(*identities)) == 16
    for rank, record in enumerate(records):  # what the sampler of rank r of 4 deals
        sampler = PKBatchSampler(labels, batch_size=8, k=2, rank=rank, world_size=4, seed=seed)
        sampler.set_epoch(0)
        assert [b[2] for b in record["batches"]] == list(sampler)

    # Identical backbone weights on the 4 ranks; BatchNorm statistics stay per rank.
    states = [torch.load(checkpoint_path(out, r), weights_only=False) for r in range(4)]
    assert [s["world_size"] for s in states] == [4] * 4 and states[0]["global_step"] == 3
    weights = [s["state_dict_backbone"] for s in states]
    params = [k for k in weights[0] if not k.endswith(_BN_STATS)]
    assert len(params) > 20
    for k in params:
        assert all(torch.equal(w[k], weights[0][k]) for w in weights[1:]), k
    assert not torch.equal(weights[0]["bn1.running_mean"], weights[3]["bn1.running_mean"])
