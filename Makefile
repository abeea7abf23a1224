# Setup and everyday commands. Each target creates the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# Every dependency pinned as tested (constraints.txt; `make lock` writes it again).
CONSTRAINTS = -c constraints.txt

.PHONY: serve web test lint generate bench bench-quick typecheck-links lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The server and the generated client package it imports.
$(VENV)/.runtime: $(BIN)/python pyproject.toml clients/python/pyproject.toml constraints.txt
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e clients/python -e .
	touch $@

$(VENV)/.web: $(VENV)/.runtime
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e '.[web]'
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e '.[test]'
	touch $@

serve: $(VENV)/.runtime  ## run on the embedded default (SQLite, in-process delivery)
	$(BIN)/twofactor serve

web: $(VENV)/.web  ## the reference login site (examples/web) on 127.0.0.1:8000, beside `make serve`
	$(BIN)/python -m examples.web

test: $(VENV)/.test  ## the whole suite (needs PostgreSQL and Redis on 127.0.0.1)
	$(BIN)/pytest

# A scratch environment with what installs today, unpinned, frozen into constraints.txt (its comment kept;
# setuptools too, which grpcio-tools needs and a plain freeze leaves out on Python 3.11).
lock:  ## pin every dependency again to the newest that installs; then run `make test`
	set -e; scratch=$$(mktemp -d); trap 'rm -rf "$$scratch" constraints.txt.new' EXIT; \
	$(PYTHON) -m venv $$scratch; \
	$$scratch/bin/pip install --quiet --upgrade pip; \
	$$scratch/bin/pip install --quiet -e clients/python -e '.[test]'; \
	{ sed -n '/^#/p' constraints.txt; echo; \
	  $$scratch/bin/pip freeze --all --exclude-editable | grep -v '^pip=='; } > constraints.txt.new; \
	mv constraints.txt.new constraints.txt

# mypy finds the server and workers under their import names through links (see [tool.mypy]).
typecheck-links:
	mkdir -p $(VENV)/typecheck
	ln -sfn $(CURDIR)/server $(VENV)/typecheck/twofactor_server
	ln -sfn $(CURDIR)/workers $(VENV)/typecheck/twofactor_workers

lint: $(VENV)/.test typecheck-links
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict -p twofactor_server -p twofactor_workers
	$(BIN)/mypy --strict clients/python/src/twofactor

generate: $(VENV)/.test  ## regenerate clients/python/src/twofactor/v1 from protos/
	$(BIN)/python scripts/gen_protos.py

# Needs PostgreSQL and Redis on 127.0.0.1; starts its own server, worker and SMTP sink (bench/README.md).
# POPULATION=1000000 first enrolls that many users in bulk (bench/populate.py) and draws the Verify and
# SendCode users from all of them: the flat-cost check (docs/benchmarks.md).
bench: $(VENV)/.test  ## every figure of issue 13 in one table (about 10 minutes, mostly enrolling users)
	$(BIN)/python bench/suite.py $(if $(POPULATION),--population $(POPULATION))

bench-quick: $(VENV)/.test  ## the same table from a short run (about a minute; figures are rougher)
	$(BIN)/python bench/suite.py --quick
