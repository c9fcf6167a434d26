# Everything a fresh machine needs: `make test` runs the tests, `make demo` the main job.
# Both create .venv, install the pinned versions and build the extension in place.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
JOBS ?= $(shell nproc)
# nvcc may be a shim on PATH; torch needs the real toolkit folder.
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME

.PHONY: all venv build test demo bench bench-quick clean

all: build

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

build: venv
	MAX_JOBS=$(JOBS) $(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m bsnas run --config configs/quickstart.yaml

bench: build
	PY=$(PY) bash benchmarks/run_cpu_bench.sh
	$(PY) benchmarks/bench_training.py --out benchmarks/results/training.md

bench-quick: build
	QUICK=1 PY=$(PY) bash benchmarks/run_cpu_bench.sh

clean:
	rm -rf build bsnas/*.so .pytest_cache
