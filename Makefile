# Two entry points (see README): `make demo` (train a tiny VQGAN + transformer, write samples) and
# `make test` (the test suite). Both create/refresh the local venv first, idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_SILENT ?= true
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: demo test test-fast venv clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m taming_dist demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=40 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .cache .pytest_cache
