# rdpt: the two commands that matter are `make demo` and `make test`.
# Both create .venv and install the pinned dependencies on first use (idempotent: the
# install is redone only when pyproject.toml or constraints.txt change).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.rdpt-installed
TORCH_PIN := torch==2.13.0
export MLFLOW_DISABLE_TELEMETRY := true
export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint install clean-demo bench-cpu help

help:
	@echo "make demo   - prepare the embedded corpus, train a tiny model on CPU, evaluate, log to MLflow"
	@echo "make test   - run the whole test suite (after make lint)"
	@echo "make lint   - ruff check + ruff format --check"
	@echo "make install- create .venv with the pinned dependencies"

install: $(STAMP)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build onto GPU-less machines.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -c constraints.txt -e '.[test,eval]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipeline.cli.demo

# lint first: a formatting slip fails in seconds instead of after the whole suite
test: lint
	$(PY) -m pytest tests --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-cpu: $(STAMP)
	$(PY) bench/prep.py
	$(PY) bench/model.py
	$(PY) bench/train.py
