"""Test helpers for Python files that are run, not imported as a package: a file loaded as a
module from its path (this checkout's ``eval/*.py``, an arcface_torch checkout's modules), and
the one ``error:`` line a command-line shell prints instead of a traceback."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

__all__ = ["error_line", "load_eval_script", "load_file"]

ROOT = Path(__file__).resolve().parents[1]


def load_file(path: str | os.PathLike, name: str) -> ModuleType:
    """Execute the file at ``path`` as a new module called ``name``; ``sys.modules`` is left
    as it was, so each call gives a fresh module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_eval_script(name: str) -> ModuleType:
    """This checkout's ``eval/NAME.py`` as a module, to call its ``main(argv)`` in-process."""
    return load_file(ROOT / "eval" / f"{name}.py", f"_eval_{name}")


def error_line(capsys) -> str:
    """The last line a shell wrote to stderr, checked to be an ``error:`` line with no
    traceback before it (``capsys`` is pytest's fixture)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ")
    return lines[-1]
