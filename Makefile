# Two commands on a fresh machine (see README):  make serve   |   make test
# `make serve` installs what serving the embedded default needs (the base install); `make test`
# adds the test tools; `make lint` / `make bench` add the dev and load tools. One stamp per set.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# llama-cpp-python builds from source; the native CPU build crashes on some hosts.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

TEST_EXTRAS  := litellm,test
DEV_EXTRAS   := litellm,test,dev,load,semantic

.PHONY: serve test install bench lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# $(1): what to install (the project, with extras); $(2): what for. llama-cpp-python compiles for
# minutes on a first install.
define pip_install
	@echo "llm-gateway: installing $(1) into $(VENV) for $(2); a first install compiles llama.cpp (~5 min on 2 cores)"
	@start=$$(date +%s); $(BIN)/pip install -q -e '$(1)' \
	  && echo "llm-gateway: installed $(1) in $$(( $$(date +%s) - start )) s"
endef

$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(call pip_install,.,serving)
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(call pip_install,.[$(TEST_EXTRAS)],the tests)
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(call pip_install,.[$(DEV_EXTRAS)],lint and benchmarks)
	touch $@

install: $(VENV)/.serve-installed

serve: $(VENV)/.serve-installed
	$(BIN)/llm-gateway serve

test: $(VENV)/.test-installed
	$(BIN)/python scripts/services.py
	$(BIN)/pytest

bench: $(VENV)/.dev-installed
	$(BIN)/python loadtest/bench.py

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check proxy backends policies loadtest tests scripts console
	$(BIN)/mypy proxy backends policies
