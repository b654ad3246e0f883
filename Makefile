# amgsn — every target bootstraps .venv itself (torch from local disk, then an editable install).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.amgsn-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2

.PHONY: setup demo test bench kernels gpu-check gpu-experiment lint clean build

setup: $(STAMP)

$(VENV)/.torch-installed:
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	touch $@

# Rebuilt only when the build inputs change: a second `make test` reuses .venv and amgsn/_C*.so.
$(STAMP): $(VENV)/.torch-installed $(SOURCES)
	$(VPY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/amgsn demo --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Every Triton kernel compiled ahead of time for sm_80-sm_90 (no GPU needed; docs/method.md §9.1): fails on a
# compile error or a spill. tests/test_kernel_report.py asserts the budgets from runs/kernels.json.
kernels: $(STAMP)
	$(VENV)/bin/amgsn kernels --arch 80,86,89,90 --json runs/kernels.json

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(MAKE) --no-print-directory kernels
	$(VPY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/amgsn bench --device cpu --json runs/bench.json

gpu-check:
	bash benchmarks/gpu_check.sh

gpu-experiment:
	bash benchmarks/gpu_experiment.sh

clean:
	rm -rf build amgsn/_C*.so $(STAMP)

# Fast incremental rebuild of amgsn._C for development (CPU kernels only unless FORCE_CUDA=1);
# serialised with a lock so parallel shells do not race in build/.
build:
	flock /tmp/amgsn-build.lock env FORCE_CUDA=$${FORCE_CUDA:-0} $(VPY) setup.py -q build_ext --inplace
