# stepvisor: two commands from a fresh clone.
#   make demo   create .venv, install, run the demo workflow on the SQLite store
#   make test   create .venv, install, lint (ruff + mypy strict), run the test suite on
#               Python 3.11, 3.12 and 3.13 (make versions), then the integration tests
#               against the real client (make client-test)
#   make bench  the benchmarks beside joblib, Dask and Ray; charts in benchmarks/results/
#   make docs   the docs site (docs/, mkdocs.yml) into site/, strictly: a broken link fails
PYTHON ?= python3
# Extras to install; CI adds the optional backends: make test EXTRAS=test,ray,bench
EXTRAS ?= test
# What make bench adds: the peers it compares with (joblib, Dask; Ray) and matplotlib.
BENCH_EXTRAS := bench,ray
# What make docs adds: MkDocs Material and mkdocstrings.
DOCS_EXTRAS := docs
VENV   := .venv
PY     := $(VENV)/bin/python
# The Python versions the suite runs on (requires-python >= 3.11): .venv's, and one
# .venv-pyX.Y each for the others. Where one is missing, make versions skips it,
# saying so, except in CI (CI set), where it fails.
PYTHONS ?= 3.11 3.12 3.13
# There the suite runs without its tests marked slow (the fault campaigns, the soak, the
# benchmark harness's quick run of every scenario: about 3 minutes per Python), which run on
# .venv's Python: three full suites took CI past its 30 minutes.
# Their extras: the test extra only, so the Ray and chart tests skip there (saying why)
# and run on .venv's Python with EXTRAS. Measured on this 2-core machine under load: with
# Ray, every Ray worker cold start cost seconds of CPU and the 3.12 suite took 15 min.
VERSIONS_EXTRAS ?= test

# stepvisor.compat's real client, tapps-agents, needs Python 3.12: its own venv,
# with stepvisor installed from this tree (editable) beside it.
CLIENT_VENV  := .venv-client
CLIENT_PY    := $(CLIENT_VENV)/bin/python
CLIENT_STAMP := $(CLIENT_VENV)/.installed-stamp
TAPPS_AGENTS ?= tapps-agents==3.7.1

.PHONY: venv bench-venv docs-venv demo test lint unit versions client-venv client-test bench \
	bench-quick chaos docs clean

# Installs again when pyproject.toml or EXTRAS asks for more than the stamp records
# (scripts/venv.sh); a no-op otherwise.
venv:
	@sh scripts/venv.sh $(PYTHON) $(VENV) $(EXTRAS)

bench-venv:
	@sh scripts/venv.sh $(PYTHON) $(VENV) $(EXTRAS),$(BENCH_EXTRAS)

docs-venv:
	@sh scripts/venv.sh $(PYTHON) $(VENV) $(EXTRAS),$(DOCS_EXTRAS)

demo: venv
	$(PY) -m stepvisor run examples/demo.yaml --report .stepvisor/demo-report.html

lint: venv
	$(PY) -m ruff check src tests benchmarks examples docs/_hooks.py
	$(PY) -m ruff format --check src tests benchmarks examples docs/_hooks.py
	$(PY) -m mypy

unit: venv
	$(PY) -m pytest

# The suite on each of PYTHONS but .venv's own (which make unit runs).
versions: venv
	@main=$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	for version in $(PYTHONS); do \
		[ "$$version" = "$$main" ] && continue; \
		if ! py=$$(sh scripts/find-python.sh "$$version"); then \
			case "$${CI:-}" in \
				""|0|false) echo "make versions: SKIPPED the suite on Python $$version:" \
					"no interpreter for it here (CI fails on this)"; continue ;; \
				*) echo "make versions: error: the suite must run on Python $$version and this" \
					"machine has none; install it (apt-get install python$$version, or" \
					"pyenv install $$version)" >&2; exit 1 ;; \
			esac; \
		fi; \
		echo "make versions: the suite on Python $$version ($$py), without its slow tests (.venv runs them)"; \
		sh scripts/venv.sh "$$py" .venv-py$$version $(VERSIONS_EXTRAS) \
			&& .venv-py$$version/bin/python -m pytest -q -m "not slow" || exit 1; \
	done

# docs first: it installs the docs extra, which the suite's docs screenshot test uses.
test: docs lint unit versions client-test

# The site, strictly: a broken link or anchor, or a reference to a name that no longer exists,
# fails the build. tests/test_docs.py runs its examples and checks that the nav lists every page.
docs: docs-venv
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

client-venv: $(CLIENT_STAMP)

$(CLIENT_STAMP): pyproject.toml
	rm -rf $(CLIENT_VENV)
	py=$$(sh scripts/find-python.sh 3.12) && "$$py" -m venv $(CLIENT_VENV)
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
bench: bench-venv
	$(PY) -m compileall -q src
	$(PY) -m benchmarks

bench-quick: bench-venv
	$(PY) -m benchmarks --quick

chaos: venv
	$(PY) -m tests.chaos --runs 1000
	$(PY) -m tests.chaos.executors --runs 200

clean:
	rm -rf $(VENV) $(CLIENT_VENV) $(foreach v,$(PYTHONS),.venv-py$(v)) .pytest_cache \
		.mypy_cache .ruff_cache site
