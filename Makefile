# The two commands a new user runs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch first, pinned, so a bare `torch` requirement never pulls a multi-GB CUDA build on a CPU box.
TORCH_PIN  := torch==2.13.0
# The Triton interpreter of 3.6.0 fails with numpy >= 2.4 ("only 0-dimensional arrays can be
# converted to Python scalars" in every kernel with a runtime-bounded loop).
TEST_PINS  := triton==3.6.0 "numpy<2.4"
BUILD_DEPS := "scikit-build-core>=0.10" "pybind11>=2.12" ninja

.PHONY: demo test bench install install-test lint clean help

help:
	@echo "make demo   - set up .venv, install lmmrt, run the demo on the embedded random model"
	@echo "make test   - set up .venv with test deps, install lmmrt (builds the CUDA extension when nvcc exists), run the suite"
	@echo "make bench  - the benchmark harness at small shapes on the torch backend (CPU smoke run)"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(VENV)/bin/python
	$(PIP) install -q $(TORCH_PIN)
	@touch $@

install: $(VENV)/.torch
	$(PIP) install -q $(BUILD_DEPS)
	$(PIP) install -q --no-build-isolation -e .

install-test: $(VENV)/.torch
	$(PIP) install -q $(BUILD_DEPS) $(TEST_PINS)
	$(PIP) install -q --no-build-isolation -e ".[test]"
	# open_flamingo pins torch 2.0.1: install it without its dependencies, for parity tests only.
	# Its modules import einops and einops-exts (also in the test extra).
	$(PIP) install -q --no-deps open-flamingo==2.0.1 einops einops-exts

demo: install
	$(VENV)/bin/lmmrt demo

test: install-test
	$(PY) -c "import lmmrt; print(lmmrt.info_text())"
	$(PY) -m pytest -q tests

bench: install-test
	$(PY) -m bench.run --smoke

lint:
	$(VENV)/bin/ruff check .

clean:
	rm -rf build dist *.egg-info .pytest_cache
