# Two entry points that do all the set-up on a fresh machine:
#   make run    set up .venv and start the app on 127.0.0.1:7860 (offline demo model by default)
#   make test   set up .venv (+ Chromium for browser tests) and run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: run test setup setup-test bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: the CPU build lies on local disk; a bare `torch` would pull a CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

setup-test: setup
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

run: setup
	$(BIN)/python app.py $(ARGS)

test: setup-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the CPU benchmarks the README's tables come from (bench/bench_gpu.py needs a GPU: docs/gpu_bench.md)
bench: setup
	$(BIN)/python -m bench.bench_engine
	$(BIN)/python bench/bench_loader.py
