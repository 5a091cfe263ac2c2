"""Logging to the terminal that follows ``sys.stdout``/``sys.stderr`` as they are now.

A ``logging.StreamHandler`` keeps the stream object it was built with. When that object is
replaced and closed (a notebook cell, a test runner's capture, a caller that redirects
``sys.stderr`` around a ``main()``), every later record fails with "--- Logging error ---".
These handlers look the stream up on each record instead.
"""

from __future__ import annotations

import logging
import sys


class ConsoleHandler(logging.StreamHandler):
    """A StreamHandler bound to the name ``"stdout"`` or ``"stderr"``, not to a stream object."""

    def __init__(self, which: str = "stderr") -> None:
        if which not in ("stdout", "stderr"):
            raise ValueError(f"ConsoleHandler writes to 'stdout' or 'stderr', not {which!r}")
        self._which = which
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._which)

    @stream.setter
    def stream(self, value) -> None:
        # StreamHandler.__init__ and setStream assign a stream; the name decides instead.
        pass


def cli_logging(level: int = logging.INFO, fmt: str = "%(message)s") -> None:
    """A command's own logging: root at ``level``, one console handler on stderr.

    Replaces whatever handlers the root logger had, so a command run twice in one process (or
    after a training run in the same process) logs once, to the terminal it has now."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler = ConsoleHandler("stderr")
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
