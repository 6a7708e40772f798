# silotune — `make demo` runs the demo experiment, `make test` the test suite; both set up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.silotune-installed

.PHONY: setup demo test test-fast lint check docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(BIN)/silotune run configs/demo.toml

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/mypy

check: lint test-fast

# The site under site/; first the pages generated from the README and the config dataclasses.
docs: setup
	$(BIN)/python scripts/gen_docs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: setup
	$(BIN)/python bench/fl_overhead.py
	$(BIN)/python bench/split_overhead.py
	$(BIN)/python bench/split_scaling.py
	$(BIN)/python bench/split_memory.py
	$(BIN)/python bench/split_load.py
	$(BIN)/python bench/split_generate.py
	$(BIN)/python bench/grpc_floor.py
	$(BIN)/python bench/compression.py
	$(BIN)/python bench/memory_plan.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
