# decodekit: every target sets up what it needs on a fresh clone.
#   make test       venv + install + ruff + pytest (Triton kernels run under TRITON_INTERPRET=1 on CPU)
#   make demo       venv + install + export stories260K + tell a story + eager/ORT/ORT-IO-binding table
#   make bench      venv + install + pytest-benchmark over bench/, report in bench/results/
#   make gpu-check  on a CUDA machine: tests compiled on the GPU (interpreter off), then the benchmarks,
#                   with whatever python already has torch + triton (no installs, the checkout on PYTHONPATH)

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= ../shared/models/stories260K
# Pins for the CPU machines: torch 2.13.0 is the CPU wheel on local disk (a bare `torch` pulls a CUDA build).
CPU_PINS := torch==2.13.0 triton==3.8.*
# the test suite runs on both cores (pytest-xdist); bench never does (timings would interfere)
PYTEST_ARGS ?= -n 2
BENCH_ARGS ?=
GPU_PYTHON ?= python3

.PHONY: setup test lint demo bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the default (CUDA) torch"; \
		$(PY) -m pip install -q -e '.[dev,hf]'; \
	else \
		echo "no NVIDIA GPU: installing the CPU build of torch first ($(CPU_PINS))"; \
		printf '%s\n' $(CPU_PINS) > $(VENV)/constraints.txt; \
		$(PY) -m pip install -q -c $(VENV)/constraints.txt torch==2.13.0 && \
		$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[dev,hf]' || exit 1; \
	fi
	@touch $@

lint: setup
	$(VENV)/bin/ruff check decodekit tests bench

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m decodekit demo --model $(MODEL)

bench: setup
	@mkdir -p bench/results
	$(PY) -m pytest bench -q --benchmark-only --benchmark-json=bench/results/.last.json $(BENCH_ARGS)
	$(PY) -m bench.report bench/results/.last.json

gpu-check:
	@mkdir -p bench/results
	PYTHONPATH=$(CURDIR):$$PYTHONPATH TRITON_INTERPRET=0 DECODEKIT_DEVICE=cuda $(GPU_PYTHON) -m pytest -q -p no:cacheprovider tests $(BENCH_ARGS)
	PYTHONPATH=$(CURDIR):$$PYTHONPATH TRITON_INTERPRET=0 $(GPU_PYTHON) -m pytest bench -q -p no:cacheprovider --benchmark-only --benchmark-json=bench/results/.last.json
	PYTHONPATH=$(CURDIR):$$PYTHONPATH $(GPU_PYTHON) -m bench.report bench/results/.last.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .benchmarks
