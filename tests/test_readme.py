"""The commands of the README and of docs/ name things that exist.

Every ``bash`` block of ``README.md`` and ``docs/*.md`` is read line by line (continuations
joined, comments dropped). A script run with Python must be a file of this repository (or of
the arcface_torch overlay), a ``python -m otface...`` module must be importable, a ``make``
target must be in the Makefile, a ``configs/NAME`` given to ``train.py`` must exist, and every
``--flag`` given to one of our scripts or modules must be in its ``--help``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Files the overlay adds to an arcface_torch checkout (commands run there).
OVERLAY = {p.name for p in (ROOT / "patches" / "arcface_torch").rglob("*") if p.is_file()}


def _commands(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                out += [part.strip() for part in re.split(r"&&|;", line) if part.strip()]
    return out


ALL = [(path.relative_to(ROOT).as_posix(), cmd) for path in DOCS for cmd in _commands(path)]


def test_the_readme_has_commands_to_check():
    readme = [cmd for where, cmd in ALL if where == "README.md"]
    assert any(cmd.startswith("make demo") for cmd in readme)
    assert any("eval/ijb.py" in cmd for cmd in readme)
    assert len(ALL) >= 30


@functools.lru_cache(maxsize=None)
def _written_by(where: str) -> set[str]:
    """Files a document has the reader save, each marked ``<!-- file: PATH -->``."""
    text = (ROOT / where).read_text(encoding="utf-8")
    return set(re.findall(r"^<!-- file: (\S+) -->$", text, flags=re.M))


# Every target's --help, all in one Python process (importing torch once, not once per
# target): each runs as `python TARGET --help` would, its output captured.
_ALL_HELP = r"""
import contextlib, io, json, runpy, sys
out = {}
for target in json.loads(sys.argv[1]):
    buf, saved = io.StringIO(), (list(sys.argv), list(sys.path))
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            if target[0] == "-m":
                sys.argv = [target[1], *target[2:], "--help"]
                runpy.run_module(target[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = [target[0], *target[1:], "--help"]
                sys.path.insert(0, target[0].rsplit("/", 1)[0] if "/" in target[0] else ".")
                runpy.run_path(target[0], run_name="__main__")
        except SystemExit:
            pass
        except Exception as exc:
            print(f"{type(exc).__name__}: {exc}")
    sys.argv, sys.path[:] = saved
    out[json.dumps(target)] = buf.getvalue()
print("\n" + json.dumps(out))
"""


@functools.lru_cache(maxsize=None)
def _all_help() -> dict:
    import json

    targets = sorted({t for _, cmd in ALL for t in [_target_of(cmd)] if t is not None})
    env = dict(os.environ, PYTHONPATH=str(ROOT / "plugin"))
    done = subprocess.run(
        [sys.executable, "-c", _ALL_HELP, json.dumps(targets)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {tuple(json.loads(k)): v for k, v in found.items()}


def _help(target: tuple[str, ...]) -> str:
    return _all_help()[target]


def _target_of(command: str):
    """What ``--help`` is asked of for ``command``: ``("-m", module[, sub-command])`` or
    ``(script,)``; None for commands that are not ours."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if not words:
        return None
    program = os.path.basename(words[0])
    if program == "torchrun":
        words = [sys.executable] + words[
            next(i for i, w in enumerate(words) if w.endswith(".py")) :
        ]
        program = "python"
    if not program.startswith("python") or len(words) < 2:
        return None
    args = words[1:]
    if args[:1] == ["-m"]:
        if not args[1].startswith("otface"):
            return None
        rest = args[2:]
        if rest and re.fullmatch(r"[a-z][a-z-]*", rest[0]):
            return ("-m", args[1], rest[0])
        return ("-m", args[1])
    if Path(args[0]).name in OVERLAY or not (ROOT / args[0]).is_file():
        return None
    return (args[0],)


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z_][\w-]*):", text, flags=re.M))


@pytest.mark.slow
@pytest.mark.parametrize("where, command", ALL, ids=[f"{w}: {c[:60]}" for w, c in ALL])
def test_each_command_names_what_exists(where, command):
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return
    program = os.path.basename(words[0])
    if program == "make":
        assert words[1] in _makefile_targets(), f"{where}: no make target {words[1]!r}"
        return
    if program == "torchrun":  # its own options come before the script
        script_at = next(i for i, w in enumerate(words) if w.endswith(".py"))
        words = [sys.executable] + words[script_at:]
        program = "python"
    if not program.startswith("python"):
        return  # pip, cd, bash and the like
    args = words[1:]
    if args[:1] == ["-m"]:
        module = args[1]
        if not module.startswith("otface"):
            return
        sys.path.insert(0, str(ROOT / "plugin"))
        try:
            assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        finally:
            sys.path.remove(str(ROOT / "plugin"))
        target, rest = ("-m", module), args[2:]
        if rest and re.fullmatch(r"[a-z][a-z-]*", rest[0]):  # a sub-command: its own --help
            target, rest = (*target, rest[0]), rest[1:]
    else:
        script = args[0]
        if Path(script).name in OVERLAY:
            return  # runs inside an arcface_torch checkout
        assert (ROOT / script).is_file(), f"{where}: no script {script}"
        target, rest = (script,), args[1:]
        if script == "train.py" and rest and rest[0].startswith("configs/"):
            written = f"{rest[0]}.py" in _written_by(where)  # a config the document has you save
            assert written or (ROOT / f"{rest[0]}.py").is_file(), f"{where}: no config {rest[0]}"
    flags = [w.split("=")[0] for w in rest if w.startswith("--")]
    if flags:
        text = _help(target)
        for flag in flags:
            assert flag in text, f"{where}: {' '.join(target)} has no {flag} ({command})"
