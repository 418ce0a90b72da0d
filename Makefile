# stepvisor: two commands from a fresh clone.
#   make demo   create .venv, install, run the demo workflow on the SQLite store
#   make test   create .venv, install, lint (ruff + mypy strict), run the test suite,
#               then the integration tests against the real client (make client-test)
PYTHON ?= python3
# Extras to install; CI adds the optional backends: make test EXTRAS=test,ray,bench
EXTRAS ?= test
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

# stepvisor.compat's real client, tapps-agents, needs Python 3.12: its own venv,
# with stepvisor installed from this tree (editable) beside it.
CLIENT_VENV  := .venv-client
CLIENT_PY    := $(CLIENT_VENV)/bin/python
CLIENT_STAMP := $(CLIENT_VENV)/.installed-stamp
TAPPS_AGENTS ?= tapps-agents==3.7.1

.PHONY: venv demo test lint unit client-venv client-test bench bench-quick chaos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	rm -f $(STAMP)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	$(PY) -m compileall -q src
	touch $(STAMP)

demo: venv
	$(PY) -m stepvisor run examples/demo.yaml --report .stepvisor/demo-report.html

lint: venv
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy

unit: venv
	$(PY) -m pytest

test: lint unit client-test

client-venv: $(CLIENT_STAMP)

$(CLIENT_STAMP): pyproject.toml
	rm -rf $(CLIENT_VENV)
	py=$$(sh tests/client/find-python312.sh) && "$$py" -m venv $(CLIENT_VENV)
	# tomli: the cursor executor imports it, but tapps-agents 3.7.1 does not declare it.
	$(CLIENT_PY) -m pip install --quiet --disable-pip-version-check '$(TAPPS_AGENTS)' tomli -e '.[test]'
	touch $(CLIENT_STAMP)

# Without a client venv (no Python 3.12, or tapps-agents not installable) the
# tests still run, under .venv, where they are reported as skipped with the reason.
client-test: venv
	@if $(MAKE) --no-print-directory client-venv; then \
		$(CLIENT_PY) -m pytest tests/client; \
	else \
		STEPVISOR_CLIENT_UNAVAILABLE="could not build $(CLIENT_VENV) with Python 3.12 and $(TAPPS_AGENTS); see the make output above" \
			$(PY) -m pytest tests/client; \
	fi

# Bytecode compiled first: with PYTHONDONTWRITEBYTECODE set (as on these machines) every
# process child would otherwise compile stepvisor's modules again as it boots.
bench: venv
	$(PY) -m compileall -q src
	$(PY) -m benchmarks

bench-quick: venv
	$(PY) -m benchmarks --quick

chaos: venv
	$(PY) -m tests.chaos --runs 1000
	$(PY) -m tests.chaos.executors --runs 200

clean:
	rm -rf $(VENV) $(CLIENT_VENV) .pytest_cache .mypy_cache .ruff_cache
