# Targets: make help
PY      := .venv/bin/python
PIP     := .venv/bin/pip
# torch 2.13.0: on a machine with nvidia-smi pip takes the CUDA wheel from PyPI; without a GPU
# the CPU build (here it lies on disk; elsewhere set TORCH_INDEX to a CPU wheel index).
TORCH   ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_INDEX ?=
SCENARIO ?= smoke_tiny
ARGS    ?=

.PHONY: help setup test test-fast test-gpu bench validate lint clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup:  ## create .venv and install everything (CUDA torch where nvidia-smi works, else CPU)
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	@echo "installing $(TORCH) ($(if $(HAS_GPU),CUDA machine,no GPU: CPU build))"
	$(PIP) install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev]'
	$(PY) -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"

test:  ## every test, two workers, a file each, one thread per process (CI; GPU tests skip)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

test-fast:  ## in-process tests only: committed records, tiny models, no worker process (< 1 min)
	$(PY) -m pytest -q -m "not slow and not gpu"

test-gpu:  ## run only the GPU tests
	$(PY) -m pytest -q -m gpu

bench:  ## run every variant of SCENARIO (default smoke_tiny); ARGS="--device cpu" etc.
	$(PY) -m harness run $(SCENARIO) $(ARGS)

validate:  ## validate every scenario under scenarios/
	$(PY) -m harness validate

lint:  ## ruff
	.venv/bin/ruff check .

clean:  ## remove scratch results
	rm -rf results/_scratch
