# The two commands a new user runs: `make demo` and `make test`. Both create .venv when missing and
# (re)install lmmrt only when something that needs a reinstall changed (stamp files in .venv/).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch first, pinned, so a bare `torch` requirement never pulls a multi-GB CUDA build on a CPU box.
TORCH_PIN  := torch==2.13.0
BUILD_DEPS := "scikit-build-core>=0.10" "pybind11>=2.12" ninja
# Optional extras of lmmrt (pyproject.toml) to add to the one editable install, e.g.
# `make demo EXTRAS=video` or `make install EXTRAS="video cupy"`: each is installed once, without rebuilding lmmrt.
EXTRAS ?=
KNOWN_EXTRAS := video cupy cupy-cuda12 triton bench serve test
ifneq ($(filter-out $(KNOWN_EXTRAS),$(EXTRAS)),)
$(error unknown EXTRAS: $(filter-out $(KNOWN_EXTRAS),$(EXTRAS)); lmmrt's extras are: $(KNOWN_EXTRAS))
endif
EXTRA_STAMPS := $(addprefix $(VENV)/.extra-,$(EXTRAS))
# pytest: 2 workers (CI has 2 cores), each taking whole files (module fixtures are built once), a line per
# test, a per-test limit so nothing hangs CI, the slowest tests listed.
PYTEST_ARGS ?= -n 2 --dist loadfile -v --timeout 300 --durations 15
# Progress lines as they happen, also when the output is a pipe or a CI log (else Python buffers them).
export PYTHONUNBUFFERED := 1

# The install is editable: Python edits need no reinstall. These do: the build files, the CUDA
# sources, and the build settings (LMMRT_CUDA, LMMRT_CUDA_ARCHS; see README "Install").
BUILD_INPUTS := pyproject.toml CMakeLists.txt $(shell find csrc -type f) $(VENV)/.build-config
BUILD_CONFIG := LMMRT_CUDA=$(LMMRT_CUDA) LMMRT_CUDA_ARCHS=$(LMMRT_CUDA_ARCHS)

.PHONY: demo test bench install install-test lint clean help FORCE

help:
	@echo "make demo   - set up .venv, install lmmrt, run the demo on the embedded random model"
	@echo "make test   - set up .venv with test deps, install lmmrt (builds the CUDA extension when nvcc exists), run the suite"
	@echo "make bench  - the benchmark harness at small shapes on the torch backend (CPU smoke run; installs the test deps)"
	@echo "make install EXTRAS=\"video serve\" - add optional extras ($(KNOWN_EXTRAS)) to .venv; also with demo/test"

$(VENV)/bin/python:
	@echo "== creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(VENV)/bin/python
	@echo "== installing $(TORCH_PIN)"
	$(PIP) install $(TORCH_PIN) $(BUILD_DEPS)
	@touch $@

# Rewritten only when the build settings differ from the last install's, so its date says when they changed.
# The comparison is made when the Makefile is read, so that `make -n` / `make -q` see an unchanged config as
# up to date (a FORCE prerequisite would make every dry run show a full rebuild).
ifneq ($(shell cat $(VENV)/.build-config 2>/dev/null),$(BUILD_CONFIG))
$(VENV)/.build-config: FORCE
endif
$(VENV)/.build-config: | $(VENV)/bin/python
	@echo '$(BUILD_CONFIG)' > $@

# One build: the package (verbose, so the CMake/nvcc steps show as they run), then its dependencies as a
# plain requirement, which pip satisfies from the installed lmmrt without building it again.
$(VENV)/.installed: $(VENV)/.torch $(BUILD_INPUTS)
	@echo "== building lmmrt (editable install; the CUDA extension is compiled when nvcc is found, which takes"
	@echo "   a few minutes; LMMRT_CUDA=OFF skips it). The build log follows."
	$(PIP) install -v --no-build-isolation --no-deps -e .
	@echo "== installing the dependencies of lmmrt"
	$(PIP) install lmmrt
	@touch $@

# The test extra's packages, the same way: lmmrt is not rebuilt for them.
$(VENV)/.installed-test: $(VENV)/.installed
	@echo "== installing the test dependencies (lmmrt[test])"
	$(PIP) install "lmmrt[test]"
	@echo "== installing open-flamingo 2.0.1 without its dependencies (parity tests only; it pins torch 2.0.1)"
	$(PIP) install --no-deps open-flamingo==2.0.1
	@touch $@

# An extra's packages as a plain requirement on the installed lmmrt, like the test extra: pip keeps the
# editable install (a `pip install ".[video]"` would replace it with a copy and rebuild the extension).
$(VENV)/.extra-%: $(VENV)/.installed
	@echo "== installing the $* extra (lmmrt[$*])"
	$(PIP) install "lmmrt[$*]"
	@touch $@

install: $(VENV)/.installed $(EXTRA_STAMPS)
install-test: $(VENV)/.installed-test $(EXTRA_STAMPS)

demo: $(VENV)/.installed $(EXTRA_STAMPS)
	$(VENV)/bin/lmmrt demo
	@echo "next: README.md, 'Convert and run a real checkpoint' and 'Python API' ($(VENV)/bin/lmmrt --help lists the commands)"

test: $(VENV)/.installed-test $(EXTRA_STAMPS)
	$(PY) -c "import lmmrt; print(lmmrt.info_text())"
	$(PY) -m pytest $(PYTEST_ARGS) tests

bench: $(VENV)/.installed-test $(EXTRA_STAMPS)
	$(PY) -m bench.run --smoke

lint:
	$(VENV)/bin/ruff check .

clean:
	rm -rf build dist *.egg-info .pytest_cache $(VENV)/.installed $(VENV)/.installed-test $(VENV)/.extra-*
