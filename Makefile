# Two commands on a fresh machine: `make demo` runs the walk-through, `make test` the
# tests. Each creates .venv and installs what it needs first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint protos check-protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fleetwire demo

test: lint
	$(BIN)/python -m pytest

# Without the tests marked slow (those that start real daemons): for a quick loop.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check hub spoke shared tests
	$(BIN)/mypy hub spoke shared

protos: $(STAMP)
	PYTHON=$(BIN)/python scripts/gen_protos.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
