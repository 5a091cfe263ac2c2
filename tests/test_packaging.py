"""The environment and the package as users install them.

- The project venv that ``make demo`` / ``make test`` build holds exactly the lock's versions.
- A wheel of this package, installed offline into a fresh venv with only the dependencies
  ``pyproject.toml`` declares (from the runtime lock's wheels, which ``make test-slow``
  collects),
  imports every public module, runs ``python -m otface.demo --help``, and leaves an installed
  torch that satisfies the range as it was.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock-cpu.txt"
RUNTIME_LOCK = REPO / "requirements" / "lock-cpu-runtime.txt"
PROJECT_VENV = REPO / ".venv"
# Packages a venv holds whatever the lock says (pip, uv, setuptools) and this package.
_NOT_LOCKED = {"pip", "setuptools", "wheel", "uv", "otface"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines) -> dict:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, sep, version = line.partition("==")
        if sep:
            pins[_canonical(name.split("[")[0].strip())] = version.split(";")[0].strip()
    return pins


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def test_the_lock_pins_exact_versions_of_what_pyproject_declares():
    pins = _pins(LOCK.read_text().splitlines())
    header = LOCK.read_text().splitlines()[:3]
    assert any("make lock" in line for line in header), "the lock's header names its command"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = list(project["dependencies"]) + extras["test"] + extras["cpu"] + extras["wandb"]
    for requirement in declared:
        name = _canonical(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])
        if name == "otface":
            continue
        assert name in pins, f"{requirement} is declared but not in {LOCK.name}"
    assert pins["torch"].endswith("+cpu"), "CI and the quick start use the CPU build of torch"
    # [gpu] replaces onnxruntime: the two never sit in one environment.
    assert "onnxruntime" not in [_canonical(r.split(">")[0]) for r in project["dependencies"]]
    assert "onnxruntime-gpu" not in pins


def test_the_runtime_lock_is_the_locks_versions_of_the_bare_package():
    pins, runtime = (
        _pins(LOCK.read_text().splitlines()),
        _pins(RUNTIME_LOCK.read_text().splitlines()),
    )
    assert runtime, f"{RUNTIME_LOCK.name} pins nothing"
    assert {name: pins.get(name) for name in runtime} == runtime
    # What only the extras bring stays out of the bare package.
    for extra_only in ("onnxruntime", "triton", "wandb", "insightface", "pytest", "geomloss"):
        assert extra_only in pins and extra_only not in runtime


def test_the_project_venv_holds_exactly_the_lock():
    if (
        Path(sys.prefix).resolve() != PROJECT_VENV.resolve()
        and os.environ.get("OTFACE_LOCK_CHECK", "1" if _in_ci() else "0") != "1"
    ):
        pytest.skip("not running in the project venv that make builds from the lock")
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    locked = _pins(LOCK.read_text().splitlines())
    installed = {k: v for k, v in _pins(freeze).items() if k in locked or k not in _NOT_LOCKED}
    differ = {
        name: (locked.get(name), installed.get(name))
        for name in set(locked) | set(installed)
        if locked.get(name) != installed.get(name)
    }
    assert not differ, f"(lock, installed) differ: {differ}"


def _public_modules() -> list:
    import otface

    names = ["otface"]
    for info in pkgutil.walk_packages(otface.__path__, prefix="otface."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def _offline_env(wheelhouse: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    # No index, no user or site pip configuration: only the lock's wheels.
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse))
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.slow
def test_a_wheel_installs_offline_with_its_declared_dependencies(tmp_path):
    wheelhouse = Path(os.environ.get("OTFACE_WHEELHOUSE", PROJECT_VENV / "wheelhouse"))
    if not (wheelhouse / ".complete").exists():
        message = f"no wheelhouse at {wheelhouse} (make test-slow collects it)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    env = _offline_env(wheelhouse)
    # Build from a copy of what the wheel is made of: an in-tree build/ folder could carry
    # modules deleted since into the wheel.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "plugin",
        source / "plugin",
        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"),
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("otface-*.whl")
    fresh = tmp_path / "fresh"
    py = str(fresh / "bin" / "python")
    if importlib.util.find_spec("uv") is not None:
        # uv (the installer `make` uses, pinned in the project venv): the same resolution of
        # the declared ranges as pip's, from the same wheels, in a fraction of pip's time.
        cache = tmp_path / "uv-cache"
        uv = [sys.executable, "-m", "uv"]
        subprocess.run([*uv, "venv", "-q", "--python", sys.executable, str(fresh)], check=True)
        install = [*uv, "pip", "install", "-q", "--offline", "--no-index", "--python", py]
        install += ["--find-links", str(wheelhouse), "--cache-dir", str(cache)]
    else:
        venv.create(fresh, with_pip=True)
        install = [py, "-m", "pip", "install", "-q", "--no-compile"]

    def install_into_fresh(*args):
        subprocess.run([*install, *args], check=True, env=env, cwd=tmp_path)

    try:
        # An installed torch satisfying the range (here the lock's CPU build) stays as it is.
        torch_pin = _pins(LOCK.read_text().splitlines())["torch"]
        install_into_fresh(f"torch=={torch_pin}")
        install_into_fresh(str(wheel))
        script = (
            "import importlib, json, sys, torch\n"
            f"names = {_public_modules()!r}\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "import otface.train, otface.evaluation, otface.export\n"
            "print(json.dumps({'torch': torch.__version__, 'file': __import__('otface').__file__,"
            " 'onnxruntime': importlib.util.find_spec('onnxruntime') is not None}))\n"
        )
        out = subprocess.run(
            [py, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr[-3000:]
        facts = json.loads(out.stdout.strip().splitlines()[-1])
        assert facts["torch"] == torch_pin
        assert "site-packages" in facts["file"], "imported from the wheel, not the checkout"
        assert not facts["onnxruntime"], (
            "onnxruntime comes with an extra ([cpu] or [gpu]), not bare"
        )
        help_out = subprocess.run(
            [py, "-m", "otface.demo", "--help"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert help_out.returncode == 0, help_out.stderr[-3000:]
        assert "usage" in help_out.stdout.lower()
    finally:
        # The unpacked wheels (uv's cache) and the fresh venv: over 2 GB, passed or failed.
        shutil.rmtree(tmp_path / "uv-cache", ignore_errors=True)
        shutil.rmtree(fresh, ignore_errors=True)


def test_without_onnxruntime_the_error_names_both_extras(monkeypatch, tmp_path):
    from otface.evaluation.models import OnnxEmbedder

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"\.\[cpu\].*\.\[gpu\].*never both"):
        OnnxEmbedder(tmp_path / "model.onnx")
