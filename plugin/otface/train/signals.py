"""Ctrl-C and SIGTERM during training: SIGTERM behaves like Ctrl-C, a checkpoint save finishes
before either takes effect, and the run remembers its last complete checkpoint for the message."""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["RUN", "Terminated", "in_main_thread", "raise_terminated", "signals_deferred"]


class RunRecord:
    """What an interrupted run reports: the last checkpoint this process completed (or the
    one it resumed from), that checkpoint's global step, and the step the run had reached."""

    last_checkpoint: str | None = None
    last_checkpoint_step: int | None = None
    global_step: int | None = None

    def reset(self) -> None:
        self.last_checkpoint = self.last_checkpoint_step = self.global_step = None


RUN = RunRecord()


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or torchrun's stop) handled like Ctrl-C."""


def raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def signals_deferred():
    """Hold Ctrl-C and SIGTERM until the block is done, then raise them.

    An interrupt inside ``torch.save`` surfaces as an unrelated ``RuntimeError`` from its zip
    writer; a checkpoint save takes seconds, so the interrupt waits for it instead.
    """
    if not in_main_thread():
        yield
        return
    pending: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        if pending[0] == signal.SIGTERM:
            raise Terminated()
        raise KeyboardInterrupt()


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
