"""Progress with an ETA: one redrawn line on a terminal; off a terminal (a log file, a pipe, a
cluster job's output), a plain line every ``line_interval_s`` seconds, so a long step is never
silent there and a short one writes nothing."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress"]


class Progress:
    """``Progress(total, "IJB features")`` then ``update(done)``; ``close()`` ends the line.

    It writes to ``stream`` (stderr by default). On a terminal it redraws one line at most every
    ``min_interval_s``: ``IJB features 1,280/11,520 (11%), 0:42 left``. Elsewhere it writes that
    line, ended, once every ``line_interval_s`` (the first after that long), and nothing else.
    """

    def __init__(
        self,
        total: int,
        label: str,
        *,
        stream: Optional[TextIO] = None,
        min_interval_s: float = 0.5,
        line_interval_s: float = 10.0,
    ) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval_s = min_interval_s
        self.line_interval_s = line_interval_s
        self._start = time.monotonic()
        self._last_draw = float("-inf")
        self._last_line = self._start
        self._drawn = False

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled:
            if now - self._last_line >= self.line_interval_s and done < self.total:
                self._last_line = now
                self.stream.write(self._line(done, now) + "\n")
                self.stream.flush()
            return
        if now - self._last_draw < self.min_interval_s and done < self.total:
            return
        self._last_draw = now
        self.stream.write("\r" + self._line(done, now).ljust(70))
        self.stream.flush()
        self._drawn = True

    def _line(self, done: int, now: float) -> str:
        frac = min(max(done, 0) / self.total, 1.0)
        elapsed = now - self._start
        left = elapsed / frac - elapsed if frac > 0 else float("nan")
        eta = _clock(left) + " left" if left == left else "estimating"
        return f"{self.label} {done:,}/{self.total:,} ({100 * frac:.0f}%), {eta}"

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
