# One source of truth for the README's commands and CI (.ci/run calls `make test`).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS ?= --disable-pip-version-check --progress-bar off

.PHONY: install demo test lint bench

$(BIN)/activate:
	$(PY) -m venv $(VENV)

install: $(BIN)/activate
	$(BIN)/pip install $(PIP_FLAGS) -q -e ".[offline,test]"

## The main job on the built-in offline default (offline zoos x generated dataset), results in runs/demo.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/pairscout rank --out runs/demo --force

## The whole test suite (no network, no GPU needed).
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check pairscout tests benchmarks

bench: install
	$(BIN)/pip install $(PIP_FLAGS) -q -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_encode.py
	$(BIN)/python benchmarks/bench_cka.py
