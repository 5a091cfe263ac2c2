"""The terminal progress line: drawn on a terminal with an ETA, silent elsewhere."""

import io

from otface.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_on_a_terminal_and_ends_its_line():
    out = _Terminal()
    with Progress(200, "IJB features", stream=out, min_interval_s=0.0) as p:
        p.update(50)
        p.update(200)
    text = out.getvalue()
    assert "\rIJB features 50/200 (25%)" in text and "200/200 (100%)" in text
    assert "left" in text and text.endswith("\n")


def test_progress_is_silent_when_not_a_terminal():
    out = io.StringIO()
    with Progress(10, "x", stream=out, min_interval_s=0.0) as p:
        p.update(5)
    assert out.getvalue() == ""
