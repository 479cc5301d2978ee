# Two commands do everything on a fresh machine:  make run  (default experiment)  ·  make test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

.PHONY: setup run test test-all bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch first (CPU wheel), then everything else pinned to it: no CUDA build is pulled.
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; else $(BIN)/pip install -q "$(TORCH)"; fi
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,slurm,optuna]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/sectune

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --timeout=900

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=1800

bench: $(STAMP)
	$(BIN)/python bench/sft_throughput.py

clean:
	rm -rf outputs .pytest_cache
