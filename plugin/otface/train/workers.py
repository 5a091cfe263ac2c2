"""A DataLoader worker that died: which one, of what, and the likely cause, in one line.

torch reports a worker killed under it as a ``RuntimeError`` ("DataLoader worker (pid(s) N)
exited unexpectedly", or "... is killed by signal: Killed"), after a traceback of the queue it
was reading. A worker killed while the main process fetches a batch's shared memory from it
surfaces instead as the socket's ``ConnectionResetError`` (or ``EOFError``), which names no
worker: the workers' exit codes do. The kernel's out-of-memory killer does this to workers on
real machines.
"""

from __future__ import annotations

import re
import signal
import time
from typing import Any

__all__ = ["DataLoaderWorkerDied", "dead_worker_error"]

_PIDS_RE = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")
_SIGNAL_RE = re.compile(r"killed by signal: (\w[\w ]*)")
_SIGNAL_NAMES = {"Killed": "SIGKILL", "Terminated": "SIGTERM", "Segmentation fault": "SIGSEGV"}


class DataLoaderWorkerDied(RuntimeError):
    """A DataLoader worker process ended while training read from it."""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _ended_workers(workers: list, wait_s: float = 2.0) -> list[int]:
    """The pids of the workers that have ended. A killed worker's socket closes as the process
    exits, a moment before its exit code can be read: wait for it up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        ended = [w.pid for w in workers if w.exitcode is not None]
        if ended or not workers or time.monotonic() >= deadline:
            return ended
        time.sleep(0.05)


def dead_worker_error(
    err: BaseException, loader: Any, *, num_workers: int
) -> DataLoaderWorkerDied | None:
    """The one-line error for ``err`` when it reports a dead DataLoader worker, else ``None``.

    ``loader`` is the DataLoader being read: with persistent workers its iterator still holds
    the worker processes, whose exit codes say how they ended.
    """
    text = str(err)
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    match = _PIDS_RE.search(text)
    if match is not None:
        pids = [int(p) for p in match[1].replace(",", " ").split()]
    elif isinstance(err, (ConnectionError, EOFError)):
        pids = _ended_workers(workers)
        if not pids:
            return None
    else:
        return None
    codes = {w.pid: w.exitcode for w in workers if w.pid in pids}
    how = []
    for pid in pids:
        code = codes.get(pid)
        if code is not None and code < 0:
            how.append(_signal_name(-code))
        elif code is not None:
            how.append(f"exit code {code}")
        else:
            named = _SIGNAL_RE.search(text)
            how.append(_SIGNAL_NAMES.get(named[1].strip(), named[1].strip()) if named else "")
    ended = ", ".join(
        f"pid {pid} " + (f"was killed by {h}" if h.startswith("SIG") else f"ended ({h})")
        if h
        else f"pid {pid} ended"
        for pid, h in zip(pids, how)
    )
    cause = ""
    if "SIGKILL" in how:
        cause = (
            ": most likely the machine ran out of memory (the kernel's OOM killer); use fewer "
            f"DataLoader workers (num_workers = {num_workers} now, each holding two batches "
            "ahead) or a smaller batch_size"
        )
    noun = "worker" if len(pids) == 1 else "workers"
    return DataLoaderWorkerDied(f"DataLoader {noun} {ended}{cause}")
