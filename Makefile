# make demo / make test create .venv on first use and install pinned dependencies.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint format clean

$(BIN)/tilemem: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/tilemem

demo: $(BIN)/tilemem
	$(BIN)/tilemem demo

test: $(BIN)/tilemem
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/pytest -n 2  # both cores: the suite is CPU-bound, its tests independent

format: $(BIN)/tilemem
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) checkpoints
