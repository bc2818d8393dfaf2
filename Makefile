# Two entry points: `make demo` and `make test`. Both build .venv from pyproject.toml first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test faults lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tracker demo

lint: $(STAMP)
	$(BIN)/ruff check tracker consumers tests benchmarks
	$(BIN)/ruff format --check tracker consumers tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

# The fault-injection suite (docs/reliability.md): real processes killed, stalled, starved.
faults: $(STAMP)
	rm -f .faults/report.jsonl
	$(BIN)/pytest -m faults tests/faults
	$(BIN)/python -m tests.faults.report

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .tracker .faults .pytest_cache .mypy_cache .ruff_cache
