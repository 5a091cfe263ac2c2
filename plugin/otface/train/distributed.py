"""Process-group set-up from ``torchrun``'s environment, or a single process without one."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "dead_local_peers",
    "init_distributed",
    "peers_on_other_hosts",
    "shutdown_distributed",
]

# (rank, host, pid) of every rank of the job, gathered once at start: on SIGTERM a rank can then
# see whether a rank of its own node has died (torchrun stops the others when one dies).
_PEERS: list[tuple[int, str, int]] = []


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: ranks and the device its tensors live on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(*, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group that ``torchrun`` describes (``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL on CUDA, gloo on CPU. Without those
    variables, a single process on CUDA device 0 or the CPU, with no process group.
    """
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return DistEnv(rank=0, local_rank=0, world_size=1, device=device)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    peers: list = [None] * world_size
    dist.all_gather_object(peers, (rank, socket.gethostname(), os.getpid()))
    _PEERS[:] = peers
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed child that its parent (torchrun) has not reaped yet is a zombie
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def dead_local_peers() -> list[tuple[int, int]]:
    """``(rank, pid)`` of the ranks on this machine that are no longer running (none known
    without a process group)."""
    host, me = socket.gethostname(), os.getpid()
    return [(r, pid) for r, h, pid in _PEERS if h == host and pid != me and _dead(pid)]


def peers_on_other_hosts() -> bool:
    """Whether some rank of the job runs on another machine (whose death this one cannot see)."""
    host = socket.gethostname()
    return any(h != host for _, h, _ in _PEERS)


def shutdown_distributed() -> None:
    _PEERS.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
