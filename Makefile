# The few commands people run. `make quickstart` and `make test` set everything up first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.discl-installed

.PHONY: setup test test-all quickstart lint format mlflow-ui clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall only when the dependency list changes (fast no-op otherwise).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

quickstart: setup
	$(BIN)/discl quickstart

lint: setup
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

mlflow-ui: setup
	$(BIN)/discl ui

clean:
	rm -rf runs .pytest_cache
