# runstate — developer and CI entry points. See README.md.
#
#   make run     venv + local Kafka/PostgreSQL + migrations + demo (stack stays up; `make down` stops it)
#   make test    venv + lint + stack + migrations + pytest, then the stack is stopped (always)
#   make lint    ruff (lint and import order) over services, tests, deploy; mypy over services/runstate
#   make up / make down / make status
#
# Variables:
#   PYTHON                  interpreter used to create .venv (default: python3, must be 3.11+)
#   PYTEST_ARGS             extra arguments for pytest, e.g. make test PYTEST_ARGS='-k infra -x'
#   RUNSTATE_TEST_BACKEND   local (default) or testcontainers (needs a Docker engine; see README)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CONSTRAINTS := constraints.txt
STACK := $(VPY) deploy/stack
ENV_FILE := .runstate/env
# Loads the connection details written by `deploy/stack up` into the recipe's shell.
LOAD_ENV := set -a && . ./$(ENV_FILE) && set +a
MIGRATE := $(VENV)/bin/runstate db upgrade
PYTEST_ARGS ?=
BENCH_ARGS ?=
RUNSTATE_TEST_BACKEND ?= local

.PHONY: venv lint up down status migrate run test faults bench

venv: $(STAMP)

# The server and test extras at the versions of constraints.txt; re-installs only when
# pyproject.toml, constraints.txt or the version (runstate/__init__.py) is newer than the stamp.
$(STAMP): pyproject.toml $(CONSTRAINTS) services/runstate/__init__.py
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -c $(CONSTRAINTS) -e '.[server,test]'
	@touch $@

# Fails fast: `make test` runs this before it starts the stack.
lint: venv
	$(VENV)/bin/ruff check services tests deploy
	$(VENV)/bin/mypy services/runstate

up: venv
	$(STACK) up

# deploy/stack down and status need only the standard library: they work before the venv exists.
down:
	@if [ -x $(VPY) ]; then $(STACK) down; else $(PYTHON) deploy/stack down; fi

status:
	@if [ -x $(VPY) ]; then $(STACK) status; else $(PYTHON) deploy/stack status; fi

migrate: venv
	@test -f $(ENV_FILE) || { echo "$(ENV_FILE) missing: run 'make up' first" >&2; exit 1; }
	$(LOAD_ENV) && $(MIGRATE)

run: up
	$(MAKE) --no-print-directory migrate
	$(LOAD_ENV) && $(VPY) -m runstate.demo
	@echo
	@echo "The stack is still running (connection details in $(ENV_FILE))."
	@echo "Stop it with: make down"

# The stack is stopped whatever happens (trap on EXIT); pytest's exit status is the target's,
# except that 5 ("no tests collected") counts as a failure. Lint runs first and stops it early.
test: venv lint
ifeq ($(RUNSTATE_TEST_BACKEND),testcontainers)
	@status=0; RUNSTATE_TEST_BACKEND=testcontainers $(VPY) -m pytest $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests — failing" >&2; status=1; fi; \
	exit $$status
else
	@trap '$(STACK) down' EXIT; \
	$(STACK) up; \
	$(LOAD_ENV); \
	echo "+ $(MIGRATE)"; $(MIGRATE); \
	status=0; $(VPY) -m pytest $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests — failing" >&2; status=1; fi; \
	exit $$status
endif

# Fault-injection scenarios (>= 20,000 commands each, 60 s PostgreSQL and Kafka outages) and the
# structure-aware fuzzer (>= 100,000 generated records); `make test` runs the same at CI size.
# The stack is stopped whatever happens; its shutdown messages go to stderr so the summary
# (scenario names, lost/duplicated/forked, internal_errors) stays the last stdout line.
faults: venv
	@trap '$(STACK) down >&2' EXIT; \
	$(STACK) up; \
	$(LOAD_ENV); \
	echo "+ $(MIGRATE)"; $(MIGRATE); \
	RUNSTATE_FAULT_SCALE=full $(VPY) tests/faults/run_faults.py $(PYTEST_ARGS)

# Benchmarks: brings up Kafka and PostgreSQL (not the services: it starts its own consumers),
# writes BENCHMARKS.md and BENCHMARKS.png, tears down what it started (about 10 minutes).
bench: venv
	$(VPY) -m pip install -q -c $(CONSTRAINTS) -e '.[server,test,bench]'
	$(VPY) tests/bench/run_bench.py $(BENCH_ARGS)
