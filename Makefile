# Two commands on a fresh machine with only Python: `make demo` and `make test`.
# Each first builds the project virtual environment .venv from the lock file (once; again when
# the lock, pyproject.toml or this Makefile changes): exactly the versions CI tested, the CPU build of torch
# among them, then this package in editable mode. GPU machines: follow the README's pip route,
# which resolves pyproject.toml's ranges and keeps your CUDA build of torch.

PYTHON ?= python3
VENV ?= .venv
LOCK := requirements/lock-cpu.txt
# The lock's subset that `pip install otface` needs (no extras), same versions.
RUNTIME_LOCK := requirements/lock-cpu-runtime.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.otface-installed
# Wheels of the lock for the offline install test (tests/test_packaging.py).
WHEELHOUSE := $(VENV)/wheelhouse
WHEELS_STAMP := $(WHEELHOUSE)/.complete
LATEST_VENV ?= .venv-latest
# The venv is installed by uv (pinned), which syncs it to the lock exactly and fast. It compiles
# the packages' bytecode at install, as pip does: where PYTHONDONTWRITEBYTECODE is set (many
# container images), Python never caches it itself, and every process (each rank, each data
# worker, each test's train.py) would compile torch's sources again, about 1.5 s of CPU apiece.
UV_VERSION := 0.13.9
# The lock's torch is the CPU build (2.13.0+cpu): it comes from a local wheel folder
# (PIP_FIND_LINKS) where there is one, else from PyTorch's CPU index.
TORCH_SOURCE ?= $(if $(PIP_FIND_LINKS),,--extra-index-url https://download.pytorch.org/whl/cpu)
UV_TORCH_SOURCE ?= $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)

# OpenMP threads that do not spin for long at barriers: a busy machine otherwise slows CPU
# training tenfold (plugin/otface/openmp.py has the measurements).
export GOMP_SPINCOUNT ?= 10000

.PHONY: demo test test-slow test-latest venv lock

demo: $(STAMP)
	$(PY) train.py configs/demo_otface --move-aside

# `make test` leaves out the tests marked slow; `make test-slow` runs just those. CI runs both.
# Tests run in TEST_WORKERS processes (pytest-xdist), each with one OpenMP thread unless
# OMP_NUM_THREADS says otherwise.
TEST_WORKERS ?= 2
PYTEST = OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest tests -n $(TEST_WORKERS) --dist worksteal

test: $(STAMP)
	$(PYTEST) -m "not slow"

test-slow: $(STAMP) $(WHEELS_STAMP)
	$(PYTEST) -m slow

venv: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml Makefile
	@echo "setting up $(VENV) from $(LOCK) (the first time takes a minute or two)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(PY) -m uv pip sync -q --compile-bytecode --python $(PY) $(UV_TORCH_SOURCE) $(LOCK)
	$(PY) -m uv pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	@touch $@

# The packaging test installs a wheel of this package into a fresh venv offline, from these.
$(WHEELS_STAMP): $(RUNTIME_LOCK) $(STAMP)
	@echo "collecting the runtime lock's wheels into $(WHEELHOUSE) for the offline install test"
	@rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PY) -m pip download -q --no-deps $(TORCH_SOURCE) -r $(RUNTIME_LOCK) -d $(WHEELHOUSE)
	@touch $@

# Drift check: the newest versions pyproject.toml's ranges allow, in a venv of its own. torch
# stays the CPU build 2.13.0 (a newer torch here would be a multi-GB CUDA build).
test-latest:
	@echo "building $(LATEST_VENV) with the newest allowed versions"
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q $(TORCH_SOURCE) --upgrade --upgrade-strategy eager \
		-c requirements/cpu-torch.txt -e '.[test]'
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/freeze.txt
	@echo "versions under test: $(LATEST_VENV)/freeze.txt"
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} OTFACE_LOCK_CHECK=0 \
		$(LATEST_VENV)/bin/python -m pytest tests -n $(TEST_WORKERS)

# Regenerates the lock (Linux x86_64, CPython 3.11, CPU torch) with uv from pyproject.toml,
# keeping the pinned versions that still fit; `make lock UPGRADE=--upgrade` takes the newest.
LOCK_FLAGS = $(UV_TORCH_SOURCE) --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--no-emit-find-links --no-emit-index-url
lock:
	$(PYTHON) -m pip install -q uv==$(UV_VERSION)
	$(PYTHON) -m uv pip compile -q pyproject.toml --extra test $(LOCK_FLAGS) \
		--constraint requirements/cpu-torch.txt $(UPGRADE) -o $(LOCK) \
		--custom-compile-command "make lock  (uv pip compile pyproject.toml --extra test, torch pinned by requirements/cpu-torch.txt, CPython 3.11, Linux x86_64: see the Makefile)"
	$(PYTHON) -m uv pip compile -q pyproject.toml $(LOCK_FLAGS) --constraint $(LOCK) \
		-o $(RUNTIME_LOCK) \
		--custom-compile-command "make lock  (uv pip compile pyproject.toml, no extras, constrained to lock-cpu.txt: see the Makefile)"
