# The commands of the README: `make demo`, `make test` and `make bench` (and `make test-fast` for developers).
# Each sets everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HEADSTART_SHARED ?= $(abspath ../shared)

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/headstart demo --out runs/demo

# The report's layout test drives Debian's Chromium: installed here when missing, so CI runs it instead of skipping.
CHROMIUM := /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The structure is checked before the behaviour: layers (import-linter, pyproject.toml) and a complexity ceiling.
test: setup $(CHROMIUM)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/xenon --max-absolute C src/
	$(PY) -m pytest -q --durations=20

$(CHROMIUM):
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium

# The tests not marked slow: the quick check while editing (`make test`, which CI runs, still runs everything).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Every benchmark script, each rewriting its own sections of BENCHMARKS.md (the Keras side needs the bench extra).
# Helper modules that are not scripts of their own are listed in BENCH_HELPERS.
BENCH_HELPERS := benchmarks/common.py benchmarks/keras_recipe.py
BENCH_SCRIPTS := $(sort $(filter-out $(BENCH_HELPERS),$(wildcard benchmarks/*.py)))

bench: $(VENV)/.bench-installed
	@set -e; for s in $(BENCH_SCRIPTS); do echo "== $$s"; $(PY) $$s; done

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache
