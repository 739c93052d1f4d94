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

# Three batches (README, "Tests"); all always run and the status is the first failure's:
# 1. the tests that run in the pytest process, spread over the cores by pytest-xdist;
# 2. `multiprocess` (slow tests of tests/e2e, tests/distributed and tests/slurm, which start ranks,
#    launchers and CLI runs of their own and leave much of a core idle): two at a time, tests that
#    share a module fixture on one worker, longest first (tests/conftest.py);
# 3. `alone`: the multiprocess tests timed against the wall clock (collective timeouts, killed ranks,
#    SLURM preemption and requeue), one at a time.
TEST_WORKERS ?= auto
MULTIPROCESS_WORKERS ?= 2

test: $(STAMP)
	@rc=0; \
	echo "== make test 1/3: tests in the pytest process, over $(TEST_WORKERS) xdist workers (-m 'not multiprocess')"; \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 -m "not multiprocess" tests || rc=$$?; \
	echo "== make test 2/3: multi-process tests, $(MULTIPROCESS_WORKERS) at a time (-m 'multiprocess and not alone')"; \
	$(PY) -m pytest -q -n $(MULTIPROCESS_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=30 \
		-m "multiprocess and not alone" tests || rc=$$?; \
	echo "== make test 3/3: tests timed against the wall clock, one at a time (-m alone)"; \
	$(PY) -m pytest -q --durations=10 -m alone tests || rc=$$?; \
	exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

clean:
	rm -rf runs .cache .pytest_cache
