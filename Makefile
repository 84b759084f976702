# Each target sets up .venv on first use (pinned versions; torch is the local CPU wheel where present).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.shardstate-installed
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(FIND_LINKS) torch==2.13.0
	$(BIN)/python -m pip install --quiet $(FIND_LINKS) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/shardstate demo

test: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
