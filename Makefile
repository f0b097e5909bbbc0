# The two commands of the README: `make demo` and `make test`. Each sets everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HEADSTART_SHARED ?= $(abspath ../shared)

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/headstart demo --out runs/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
