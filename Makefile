# On a fresh machine (Python 3.10+):  make generate   |   make inspect   |   make test
# Each creates .venv on first use: torch 2.13.0 first, then this project with its test extras.
# TORCH_INDEX picks where torch comes from. Default (empty): pip's configured index — PyPI, whose
# Linux wheel carries the CUDA libraries (several GB), unless pip finds a local CPU wheel first (as on
# this project's machines). `make TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes PyTorch's
# CPU-only wheel (~200 MB); `.../whl/cu128` a CUDA build.
PY ?= python3
TORCH_INDEX ?=
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(STAMP)

.PHONY: generate inspect test
# a whole tiny FLUX.1-dev pipeline (offline, random weights) on 2 ranks: time per stage, memory per rank
generate: $(STAMP)
	$(VENV)/bin/torchrun --nproc-per-node 2 -m npu_dit.tools.cli generate flux.1-dev --async-ulysses --warmup 1 --out flux-tiny.png

inspect: $(STAMP)
	$(VENV)/bin/npu-dit inspect flux.1-dev

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=30 -n 2 --dist load --maxschedchunk 1
