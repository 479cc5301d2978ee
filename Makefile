# Two commands do everything on a fresh machine:  make run  (the whole auth-log analyst)  ·  make test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

.PHONY: setup run test test-all bench clean

$(STAMP): pyproject.toml constraints.txt
	@# sectune and torch 2.13 need Python >= 3.10: macOS's own python3 (Xcode tools) is 3.9, where pip said only that
	@# no torch==2.13.0 was found
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "make setup: $(PY) is Python $$($(PY) -c 'import platform; print(platform.python_version())'); sectune needs >= 3.10: e.g. make setup PY=python3.11" >&2; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch first (CPU wheel), then everything else pinned to it: no CUDA build is pulled.
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; else $(BIN)/pip install -q "$(TORCH)"; fi
	@# federated (Flower + Ray, ~20 s more): in the same resolve as optuna, so pip picks a cliff/cmd2 that takes Flower's rich<15
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,slurm,optuna,federated]"
	touch $(STAMP)

setup: $(STAMP)

# The whole analyst on the tiny model and the real logs: SFT → reward model → GRPO → DPO → inference →
# the held-out table (conf/experiment/auth_grpo_tiny.yaml; report.md in the run dir). On a machine
# busy with other work, OMP_NUM_THREADS=1 avoids OpenMP's spinning threads (an 11x slower SFT step
# was seen on a 2-core box at load 7).
run: $(STAMP)
	$(BIN)/sectune +experiment=auth_grpo_tiny

# Two pytest workers (pytest-xdist), one file per worker at a time (module fixtures train once), one
# OpenMP thread each so the two never fight over 2 cores. TEST_WORKERS=1 runs the suite in one process.
# --no-loadscope-reorder: files go out in collection order, the longest first (tests/conftest.py's
# LONGEST_FILES_FIRST), so the two workers end together.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --timeout=900 --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=1800

bench: $(STAMP)
	$(BIN)/python bench/sft_throughput.py

clean:
	rm -rf outputs .pytest_cache build dist  # build/: a wheel built from a stale one still ships deleted modules
