# Two commands on a fresh machine with only Python: `make demo` and `make test`.
# Each first builds a project virtual environment in .venv (once; again when requirements.txt
# or pyproject.toml change): the pinned CPU build of torch if the venv has no torch yet, the
# requirements, pytest and this package in editable mode. GPU machines: follow the README's
# pip route instead, which keeps your CUDA build of torch.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.otface-installed
TEST_STAMP := $(VENV)/.otface-test-extras

# OpenMP threads that do not spin for long at barriers: a busy machine otherwise slows CPU
# training tenfold (plugin/otface/openmp.py has the measurements).
export GOMP_SPINCOUNT ?= 10000

.PHONY: demo test venv

demo: $(STAMP)
	$(PY) train.py configs/demo_otface --move-aside

test: $(STAMP) $(TEST_STAMP)
	$(PY) -m pytest tests

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt pytest
	$(PY) -m pip install -q --no-deps -e .
	@touch $@

# Triton runs the fused Sinkhorn kernel's tests on the CPU (TRITON_INTERPRET=1); without it
# those tests are skipped. wandb runs the W&B logging tests (offline mode).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q triton || echo "triton not installable here: its tests will be skipped"
	$(PY) -m pip install -q wandb
	@touch $@
