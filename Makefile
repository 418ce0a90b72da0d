# stepvisor: two commands from a fresh clone.
#   make demo   create .venv, install, run the demo workflow on the SQLite store
#   make test   create .venv, install, lint (ruff + mypy strict), run the test suite
PYTHON ?= python3
# Extras to install; CI adds the optional backends: make test EXTRAS=test,ray,bench
EXTRAS ?= test
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo test lint unit bench bench-quick chaos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	rm -f $(STAMP)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: venv
	$(PY) -m stepvisor run examples/demo.yaml --report .stepvisor/demo-report.html

lint: venv
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy

unit: venv
	$(PY) -m pytest

test: lint unit

bench: venv
	$(PY) -m benchmarks

bench-quick: venv
	$(PY) -m benchmarks --quick

chaos: venv
	$(PY) -m tests.chaos --runs 1000

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
