# Two commands on a fresh machine (Python 3.10+):  make inspect   |   make test
# Each creates .venv on first use: torch 2.13.0 first (the CPU build; an open range could pull a
# multi-GB CUDA build), then this project with its test extras.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(STAMP)

.PHONY: inspect test
inspect: $(STAMP)
	$(VENV)/bin/npu-dit inspect flux.1-dev

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
