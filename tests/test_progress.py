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


def test_progress_off_a_terminal_writes_a_line_every_interval(monkeypatch):
    import otface.progress as progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    with Progress(100, "IJB features", stream=out, line_interval_s=10.0) as p:
        for done, at in [(5, 101.0), (10, 109.0), (20, 110.0), (30, 115.0), (40, 121.0)]:
            clock[0] = at
            p.update(done)
        clock[0] = 135.0
        p.update(100)  # the end writes nothing: the caller reports what was done
    # Lines at 10 s and 21 s only (the first after 10 s, then 10 s apart), each ended.
    assert out.getvalue().splitlines() == [
        "IJB features 20/100 (20%), 0:40 left",
        "IJB features 40/100 (40%), 0:32 left",
    ]
    quick = io.StringIO()
    with Progress(10, "x", stream=quick) as p:
        p.update(5)
    assert quick.getvalue() == ""  # a short task off a terminal writes nothing
