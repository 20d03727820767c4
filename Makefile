# Two commands on a fresh machine (see README):  make serve   |   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# llama-cpp-python builds from source; the native CPU build crashes on some hosts.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: serve test install bench lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[semantic,test,load,dev,litellm]'
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/llm-gateway serve

test: $(VENV)/.installed
	$(BIN)/python scripts/services.py
	$(BIN)/pytest

bench: $(VENV)/.installed
	$(BIN)/python loadtest/bench.py

lint: $(VENV)/.installed
	$(BIN)/ruff check proxy backends policies loadtest tests
	$(BIN)/mypy proxy backends policies
