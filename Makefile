# The two Quickstart commands (`make demo`, `make test`) install what they need by themselves.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo study test lint format

venv:
	@bash scripts/bootstrap.sh

demo: venv
	$(VENV)/bin/moalign demo

study: venv
	$(VENV)/bin/moalign study

test: venv
	$(PY) -m ruff check src tests
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

format: venv
	$(PY) -m ruff format src tests
	$(PY) -m ruff check --fix src tests
