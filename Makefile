# hf_rmtkd — `make demo` and `make test` each install everything they need first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg

.PHONY: install test test-fast demo lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt requirements-offline.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU build: unpinned, pip pulls a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	$(PIP) install --quiet --no-deps -r requirements-offline.txt
	touch $@

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

demo: install
	$(PY) examples/demo.py

lint: install
	$(PY) -m ruff check src tests examples benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

.PHONY: bench bench-quick bench-paper

# Benchmarks: results in benchmarks/results/, the README "Benchmarks" section regenerated from them.
# Extra flags through BENCH_FLAGS, e.g. `make bench-quick BENCH_FLAGS="--threads 1"` on a shared machine.
# Processes can share one run: `make bench BENCH_FLAGS="--worker --accuracy-only --threads 1"` in several shells
# make the untimed rows; then `make bench BENCH_FLAGS=--resume` alone makes the timed ones and writes the results.
BENCH_FLAGS ?=

bench: install
	$(PY) benchmarks/run.py $(BENCH_FLAGS)

bench-quick: install
	$(PY) benchmarks/run.py --quick $(BENCH_FLAGS)

# Opt-in, about 3 hours on 2 cores: the paper's BERT-base setting (trained from scratch on the task), then RMT-KD.
bench-paper: install
	$(PY) benchmarks/run.py --paper-scale $(BENCH_FLAGS)
