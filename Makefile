# The README's commands. Each target creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
JOBS   ?= $(shell nproc)
KERNEL_SOURCES := setup.py $(shell find kernels -type f)

.PHONY: install demo test test-slow sanitize bench check gpu-check clean

# torch (a CUDA build where the index serves one, so the CUDA kernels compile and link
# even without a GPU) and the build tools first: setup.py imports torch.
$(VENV)/.build-deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch ninja setuptools wheel
	touch $@

# The package itself, editable, with every extra; ninja rebuilds only changed kernels. A working
# copy builds the CPU kernels for the SIMD levels this CPU runs (a wheel builds every level).
$(VENV)/.installed: $(VENV)/.build-deps pyproject.toml $(KERNEL_SOURCES)
	MAX_JOBS=$(JOBS) BPEXT_SIMD_LEVELS=$${BPEXT_SIMD_LEVELS:-native} $(PIP) install -q --no-build-isolation -e ".[test,bench,demo]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m bpext demo

# On every core (pytest-xdist): each test is independent of the others' order and process.
test: install
	$(PY) -m pytest -q -m "not slow" -n $(JOBS)

# Tests marked slow (tensors past 2^31 elements: about 13 GB of memory).
test-slow: install
	$(PY) -m pytest -q -m slow

# The test suite against CPU kernels built with AddressSanitizer and UBSan (build/sanitize).
sanitize: install
	JOBS=$(JOBS) bash scripts/sanitize.sh

check: install
	$(PY) -m bpext check

bench: install
	$(PY) -m bpext bench

# For the GPU machine: its own python3 and torch, no venv, no network.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build $(VENV) bpext/_*.so *.egg-info
