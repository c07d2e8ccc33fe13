# longdl: `make run` serves the demo, `make test` runs every test. Both set up what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run seed test lint typecheck fuzz container-test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "longdl needs Python 3.11 or newer"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

seed: install
	$(BIN)/longdl seed

# Demo delays make progress visible: each job spends a few seconds "talking to upstream".
run: seed
	DOWNLOAD_DELAY_ENABLED=$${DOWNLOAD_DELAY_ENABLED:-true} \
	DOWNLOAD_DELAY_MIN_MS=$${DOWNLOAD_DELAY_MIN_MS:-2000} \
	DOWNLOAD_DELAY_MAX_MS=$${DOWNLOAD_DELAY_MAX_MS:-6000} \
	$(BIN)/longdl serve

lint: install
	$(BIN)/ruff check longdl tests examples bench
	$(BIN)/ruff format --check longdl tests examples bench

# longdl/, then each example folder on its own (both have an app.py).
typecheck: install
	$(BIN)/mypy
	$(BIN)/mypy examples/extraction
	$(BIN)/mypy examples/slow_upstream

test: lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

# schemathesis, every check, against a real longdl serve: over 2,000 generated cases.
# (make test runs a short campaign: tests/test_schemathesis.py.)
fuzz: install
	$(BIN)/python tests/fuzz.py --max-examples 150 --seed 7

# Build the Dockerfile with podman and check the image as a user would (as root; .ci/run
# installs podman and mmdebstrap). Plain python3: the check needs only the stdlib.
container-test:
	$(PYTHON) tests/container_check.py

# Measurements, not pass/fail tests: each prints its figures (see bench/__init__.py).
bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) longdl-data .pytest_cache .mypy_cache .ruff_cache
