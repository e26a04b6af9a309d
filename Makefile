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

.PHONY: demo test lint install clean-demo bench-cpu help test-mcore-latest

help:
	@echo "make demo   - prepare the embedded corpus, train a tiny model on CPU, evaluate, log to MLflow"
	@echo "make test   - run the whole test suite (after make lint)"
	@echo "make lint   - ruff check + ruff format --check"
	@echo "make install- create .venv with the pinned dependencies"
	@echo "make test-mcore-latest - the model tests against megatron-core 0.19 (side venv)"

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

# lint first: a formatting slip fails in seconds instead of after the whole suite.
# Two pytest sessions side by side: the Slurm tests spend much of their time waiting on the
# cluster (requeue delays, node timeouts, paced steps), which the rest of the suite fills.
# Self-contained training tests (no shared trained-run fixture) join them, so that both
# sessions take about as long (clean clone, 2 cores: main 26 min and Slurm 13 min at first;
# main 22.8 and second 14.0 with the first four files below).
# Each has its own temp root; the second session's output is printed after the main one's.
SECOND_SESSION := tests/test_slurm_*.py tests/test_submit_*.py tests/test_coconut_train.py \
	tests/test_train_parity.py tests/test_loss_curve.py tests/test_optim_ellis.py \
	tests/test_compile.py tests/test_precision.py tests/test_pause_tokens.py
test: lint
	@tmp=$$(mktemp -d /tmp/rdpt-tests.XXXXXX); \
	$(PY) -m pytest $(SECOND_SESSION) --basetemp=$$tmp/second --durations=8 \
		> $$tmp/second.log 2>&1 & second=$$!; \
	$(PY) -m pytest tests $(foreach f,$(SECOND_SESSION),--ignore-glob='$(f)') \
		--basetemp=$$tmp/main --durations=15; main_rc=$$?; \
	wait $$second; second_rc=$$?; \
	echo "==== Slurm, submit and self-contained training tests (run beside the others)"; \
	cat $$tmp/second.log; \
	echo "==== main session exit $$main_rc, second session exit $$second_rc"; \
	rm -rf $$tmp; test $$main_rc -eq 0 -a $$second_rc -eq 0

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-cpu: $(STAMP)
	$(PY) bench/prep.py
	$(PY) bench/model.py
	$(PY) bench/train.py

# megatron-core 0.19 (what GPU images with Python 3.12 get) on this Python 3.11: its wheel
# declares Requires-Python >= 3.12 but installs with --ignore-requires-python; it imports
# triton at `import megatron.core`. A side venv sees .venv's packages through a .pth file and
# shadows only megatron-core (and adds triton); .venv stays as it is.
MCORE_VENV := .venv-mcore-latest
MCORE_PIN := megatron-core==0.19.2
TRITON_PIN := triton==3.9.0
$(MCORE_VENV)/.installed: $(STAMP)
	$(PYTHON) -m venv $(MCORE_VENV)
	$(PY) -c "import site; print(f'import site; site.addsitedir({site.getsitepackages()[0]!r})')" \
		> $$($(MCORE_VENV)/bin/python -c "import site; print(site.getsitepackages()[0])")/zz-rdpt.pth
	$(MCORE_VENV)/bin/pip install -q --no-deps --ignore-requires-python $(MCORE_PIN) $(TRITON_PIN)
	@touch $@

test-mcore-latest: $(MCORE_VENV)/.installed
	$(MCORE_VENV)/bin/python -c "import megatron.core as m; print('megatron-core', m.__version__)"
	$(MCORE_VENV)/bin/python -m pytest -q tests/test_model.py tests/test_model_reference.py \
		tests/test_model_tp.py tests/test_loss_chunked.py tests/test_attention_backend.py \
		tests/test_precision.py tests/test_compile.py
