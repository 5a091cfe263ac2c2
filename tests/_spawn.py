"""Test helpers that start processes: ranks of a gloo group on this machine, and ``train.py``
run as a command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import torch
import torch.multiprocessing as mp

from otface.train.distributed import DistEnv, init_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "train.py")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, world_size: int, port: int) -> DistEnv:
    """Join a ``world_size``-process gloo group as torchrun would describe it (one CPU thread
    a rank, 60 s collective timeout)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    return init_distributed(timeout_s=60)


def spawn_ranks(target, *args, world_size: int = 2, timeout_s: float = 180) -> None:
    """Run ``target(rank, world_size, port, *args)`` in fresh processes; wait for them.

    Not ``mp.spawn(join=True)``: gloo occasionally aborts a process at teardown, after its
    result is saved. A rank still running after ``timeout_s`` is killed; the caller checks the
    results the ranks saved.
    """
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=target, args=(r, world_size, port, *args)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout_s)
        if p.is_alive():
            p.kill()


def run_train(
    config_path: str, *args: str, timeout: float, **kwargs
) -> subprocess.CompletedProcess:
    """``python train.py CONFIG ARGS`` to the end, its output captured as text; ``kwargs`` go to
    :func:`subprocess.run` (``cwd``, ``env``)."""
    return subprocess.run(
        [sys.executable, TRAIN_PY, config_path, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def start_train(config_path: str, *args: str, wait_for: str, timeout_s: float = 120, **kwargs):
    """Start ``python train.py CONFIG ARGS`` and return its :class:`subprocess.Popen` once the
    file ``wait_for`` exists, the run has ended, or ``timeout_s`` has passed; ``kwargs`` go to
    ``Popen``."""
    proc = subprocess.Popen([sys.executable, TRAIN_PY, config_path, *args], **kwargs)
    deadline = time.time() + timeout_s
    while not os.path.exists(wait_for) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return proc


def run_without_triton_interpreter(script: str) -> None:
    """Run Python ``script`` in a fresh process where ``TRITON_INTERPRET`` is unset (so that
    ``triton.compile`` targets a real GPU architecture), or skip the calling test when this
    triton has no NVIDIA backend. A failure in the script fails the caller."""
    import pytest
    import triton.backends

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton 3.9's notice; its default
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
