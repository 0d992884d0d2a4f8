# Two commands do all the set-up on a fresh machine:
#   make demo   # create .venv, install, and run the offline demo (train nano on the built-in corpus, then chat)
#   make test   # create .venv, install with the dev extras, and run the whole test suite
#
# torch: when the venv has no torch yet, $(TORCH) is installed first. From PyPI on Linux,
# torch==2.13.0 is the CUDA build; on this project's CI machines it resolves to a CPU wheel on disk.
# To use another build (e.g. a CUDA version matching your driver), install it into .venv first,
# or run `make demo TORCH="torch==X.Y.Z"`.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
ARGS ?=
# Test processes (pytest-xdist). Files stay whole on one worker (--dist loadfile: module fixtures are built
# once); 2 took the suite from 13.6 to 8.4 minutes on a 2-core CI machine. TEST_WORKERS=0 runs it in-process.
TEST_WORKERS ?= 2

.PHONY: demo test lint install install-dev clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(PY) -m cogni_mamba demo $(ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
