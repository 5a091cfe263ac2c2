"""Terminal logging follows sys.stdout/sys.stderr after they are swapped and the old ones closed."""

import io
import logging
import sys

import pytest

from otface.console_log import ConsoleHandler, cli_logging


@pytest.fixture
def clean_root():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def test_handler_writes_to_the_stream_of_the_moment(monkeypatch, clean_root):
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    cli_logging(logging.INFO)
    logging.getLogger("x").info("one")
    monkeypatch.setattr(sys, "stderr", second)
    first.close()  # as a test runner or notebook closes the stream it replaced
    logging.getLogger("x").info("two")
    assert second.getvalue() == "two\n"  # no "--- Logging error ---", nothing lost


def test_cli_logging_twice_logs_once(monkeypatch, clean_root):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    cli_logging(logging.INFO)
    cli_logging(logging.INFO)
    logging.getLogger("x").info("once")
    logging.getLogger("x").debug("below the level")
    assert out.getvalue() == "once\n"
    assert len(clean_root.handlers) == 1


def test_stdout_handler_and_bad_name(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    handler = ConsoleHandler("stdout")
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.emit(logging.makeLogRecord({"msg": "hello", "levelno": logging.INFO}))
    assert out.getvalue() == "hello\n"
    with pytest.raises(ValueError, match="'stdout' or 'stderr'"):
        ConsoleHandler("stdlog")
