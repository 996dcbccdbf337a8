# decodekit: every target sets up what it needs on a fresh clone.
#   make test       venv + install + ruff + pytest (Triton kernels run under TRITON_INTERPRET=1 on CPU), triton
#                   pinned to TRITON_PIN
#   make test-triton the kernel tests under each other tested triton (TRITON_OTHER), each in its own venv
#                   .venv-triton-X.Y (CPU machines: the CPU torch wheel); make test-triton-3.9 runs one
#   make test-floor the tests again with every dependency at the lower bound pyproject.toml states (.venv-floor:
#                   torch 2.10, triton 3.6, onnxruntime 1.22, transformers 5.19, ...)
#   make demo       venv + install + export stories260K + tell a story + eager/ORT/ORT-IO-binding table
#   make bench      venv + install + pytest-benchmark over bench/, reports in bench/results/ (tables, the sampler
#                   sweep's plot); make bench-sampling runs the sampler sweep alone
#   make fuzz       venv + install + the CLI fuzz (tests/test_cli_fuzz.py): FUZZ_SCALE x the examples + slow cases
#   make gpu-check  on a CUDA machine (bench/gpu_check.py, GPU_BUDGET=420 s): kernels vs references compiled,
#                   CUDA-graph replay, headline benchmarks, then the tests while time remains; whatever python
#                   already has torch + triton (no installs, the checkout on PYTHONPATH); results into GPU_OUT

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= ../shared/models/stories260K
# Pins for the CPU machines: torch 2.13.0 is the CPU wheel on local disk (a bare `torch` pulls a CUDA build).
# The tested triton releases are TRITON_PIN (make test), TRITON_OTHER (make test-triton) and 3.6, the floor (make
# test-floor, beside torch 2.10; make test-triton-3.6 pairs it with torch 2.13); pyproject.toml's range spans them.
TRITON_PIN := 3.8
TRITON_OTHER ?= 3.9
CPU_PINS := torch==2.13.0 triton==$(TRITON_PIN).*
# Extra pins of one triton's venv. triton 3.6's interpreter calls int() on 1-element arrays (a range() over a
# kernel argument), which NumPy 2.4 made an error; only the interpreter needs this (compiled kernels do not).
TRITON_PINS_3.6 := numpy<2.4
# the kernel tests: the interpreter runs of every op family, their sm_90 compile, and attention inside models
KERNEL_TESTS ?= tests/ops tests/nn/test_attention_models.py
# the test suite runs on both cores (pytest-xdist); bench never does (timings would interfere)
PYTEST_ARGS ?= -n 2
BENCH_ARGS ?=
GPU_PYTHON ?= python3

.PHONY: setup test test-triton test-floor lint demo bench bench-sampling gpu-check clean fuzz

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

# One venv per extra triton release, made like $(VENV) on a CPU machine (torch CPU wheel first, then the project).
.venv-triton-%/.installed: pyproject.toml Makefile
	@test -x $(@D)/bin/python || $(PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install -q --upgrade pip
	printf '%s\n' torch==2.13.0 'triton==$*.*' $(foreach p,$(TRITON_PINS_$*),'$(p)') > $(@D)/constraints.txt
	$(@D)/bin/python -m pip install -q -c $(@D)/constraints.txt torch==2.13.0
	$(@D)/bin/python -m pip install -q -c $(@D)/constraints.txt -e '.[dev,hf]'
	@touch $@
.PRECIOUS: .venv-triton-%/.installed  # a pattern-built prerequisite, which make would otherwise delete

test-triton-%: .venv-triton-%/.installed
	@echo "== kernel tests under triton $$(.venv-triton-$*/bin/python -c 'import triton; print(triton.__version__)')"
	@start=$$SECONDS; DECODEKIT_AOT_ARCHS=90 .venv-triton-$*/bin/python -m pytest $(PYTEST_ARGS) $(KERNEL_TESTS); rc=$$?; \
		echo "== triton $*: kernel tests took $$((SECONDS - start)) s (exit $$rc)"; exit $$rc

# every version is run even when one fails; the exit status says whether all passed
test-triton:
	@rc=0; for v in $(TRITON_OTHER); do $(MAKE) --no-print-directory test-triton-$$v || rc=1; done; exit $$rc

# Every dependency at the lower bound pyproject.toml states, in .venv-floor: uv resolves the project with
# --resolution lowest-direct (Python 3.10; torch 2.10.0, the first torch built for triton 3.6; triton 3.6.0;
# onnxruntime-gpu 1.22.0 on Linux x86-64, onnxruntime elsewhere; onnx, onnxscript, gguf, transformers, ... at their
# floors); the test tools at their newest releases for that Python (resolved alone, so that they pin nothing else:
# they are not what users install). FLOOR_TESTS run there: kernels under triton 3.6 with their
# sm_90 compile, torch.compile, export, ONNX Runtime, the Hugging Face and GGUF paths, the CLIs. On a CPU machine
# that torch is a CUDA build of several GB (PyPI's only Linux x86-64 build of 2.10), run on the CPU.
FLOOR_VENV := .venv-floor
# the whole suite but the Triton sampler's statistical draws (5 x 256 interpreted programs, about 160 s of CPU: they
# keep .ci/run inside its 30 minutes; make test and make test-triton run them under triton 3.8 and 3.9, and the
# floor run still checks every draw's kept set)
FLOOR_TESTS ?= tests -k 'not (test_frequencies_match_the_kept_distribution and triton)'
FLOOR_TOOLS := pytest|pytest-benchmark|pytest-xdist|hypothesis|ruff|matplotlib
# Python at its floor too (requires-python): a python3.10 that runs, else pyenv's, else $(PYTHON) (the banner says
# which ran)
FLOOR_PYTHON ?= $(firstword $(shell python3.10 -c 'import sys; print(sys.executable)' 2>/dev/null) \
	$(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) $(PYTHON))
$(FLOOR_VENV)/.installed: pyproject.toml Makefile
	@test -x $(@D)/bin/python || $(FLOOR_PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install -q --upgrade pip uv
	printf '%s\n' $(subst |, ,$(FLOOR_TOOLS)) | $(@D)/bin/uv pip compile -q --python $(@D)/bin/python - \
		| grep -iE '^($(FLOOR_TOOLS))==' > $(@D)/tools.txt
	$(@D)/bin/uv pip install -q --python $(@D)/bin/python --resolution lowest-direct -c $(@D)/tools.txt -e '.[dev,hf]'
	@touch $@

test-floor: $(FLOOR_VENV)/.installed
	@echo "== the tests with every dependency at its floor: python $$($(FLOOR_VENV)/bin/python -V | cut -d' ' -f2)," $$($(FLOOR_VENV)/bin/uv pip list --python \
		$(FLOOR_VENV)/bin/python 2>/dev/null | awk 'tolower($$1) ~ /^(torch|triton|numpy|onnx|onnxscript|onnxruntime(-gpu)?|gguf|jinja2|transformers|tokenizers|safetensors|accelerate)$$/ {printf "%s %s, ", $$1, $$2}')
	@start=$$SECONDS; DECODEKIT_AOT_ARCHS=90 $(FLOOR_VENV)/bin/python -m pytest $(PYTEST_ARGS) $(FLOOR_TESTS); rc=$$?; \
		echo "== dependency floors: tests took $$((SECONDS - start)) s (exit $$rc)"; exit $$rc

lint: setup
	$(VENV)/bin/ruff check decodekit tests bench

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m decodekit demo --model $(MODEL)

# the CLI fuzz with FUZZ_SCALE times the hypothesis examples plus the slow cases (signals at
# more moments); one process, so that it prints how many distinct bad inputs it tried and how many were handled
FUZZ_SCALE ?= 10
fuzz: setup
	DECODEKIT_FUZZ_SCALE=$(FUZZ_SCALE) $(PY) -m pytest -q -p no:xdist -p no:randomly -rxs tests/test_cli_fuzz.py

# pytest-benchmark's own calibration, shortened (the sampler sweep's ratios come from its interleaved timing)
BENCH_TIMING ?= --benchmark-max-time=0.1 --benchmark-min-rounds=3

bench: setup
	@mkdir -p bench/results
	$(PY) -m pip install -q -e '.[bench]'
	@# the peers of bench/bench_peers.py (benchmark-only; skipped there with the reason when they do not install);
	@# onnxruntime-genai without its `onnxruntime` requirement, which would overwrite onnxruntime-gpu's files
	$(PY) -m pip install -q -e '.[peers]' || echo "bench: ctranslate2 not installed (bench_peers.py skips it)"
	$(PY) -m pip install -q --no-deps 'onnxruntime-genai>=0.8' || echo "bench: onnxruntime-genai not installed"
	$(PY) -m pytest bench -q --benchmark-only $(BENCH_TIMING) --benchmark-json=bench/results/.last.json $(BENCH_ARGS)
	$(PY) -m bench.report bench/results/.last.json
	$(PY) -m bench.report_sampling bench/results/.last.json

bench-sampling: setup
	@mkdir -p bench/results
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m pytest bench/bench_sampling.py -q --benchmark-only $(BENCH_TIMING) \
		--benchmark-json=bench/results/.sampling.json $(BENCH_ARGS)
	$(PY) -m bench.report_sampling bench/results/.sampling.json

# one script sized to a short GPU lease (bench/gpu_check.py): correctness compiled, CUDA-graph replay, the headline
# benchmarks, then the test suite while time remains; results land in GPU_OUT as they are measured
GPU_OUT ?= bench/results/gpu-run
GPU_BUDGET ?= 420
gpu-check:
	@mkdir -p $(GPU_OUT)
	PYTHONPATH=$(CURDIR):$$PYTHONPATH TRITON_INTERPRET=0 $(GPU_PYTHON) -m bench.gpu_check --out $(GPU_OUT) --budget $(GPU_BUDGET)

clean:
	rm -rf $(VENV) $(foreach v,$(TRITON_OTHER),.venv-triton-$(v)) .pytest_cache .ruff_cache .benchmarks $(FLOOR_VENV)
