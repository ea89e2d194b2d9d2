# Two entry points: `make demo` (the main job) and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel; on a CUDA machine use e.g. `make TORCH=torch demo`.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup demo test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[tests,plots]"
	touch $@

demo: setup
	$(PY) -m sb3_qchunk.demo

test: setup
	$(PY) -m pytest -q tests
