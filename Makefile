# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates (or refreshes, when pyproject.toml changes) the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch pinned to the CPU wheel this machine has on disk; on a GPU machine: make TORCH=torch demo
TORCH ?= torch==2.13.0

.PHONY: install demo test bench lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,diffusers]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/tdm demo --out runs/demo

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/passes.py --out runs/bench
