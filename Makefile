# Two commands for a fresh clone:  make demo  (the main job)   make test  (the test suite)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test completions clean

# CPU-only machines get the pinned CPU build of torch first, so no multi-GB CUDA build is pulled.
$(STAMP): pyproject.toml domains/faces/pyproject.toml domains/cats/pyproject.toml domains/art/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[test]" -e domains/faces -e domains/cats -e domains/art
	$(BIN)/pip install -q --no-deps clip-anytorch
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/e4t domains

test: $(STAMP)
	$(BIN)/python -m pytest -q

completions: $(STAMP)
	$(BIN)/python scripts/make_completions.py

clean:
	rm -rf $(VENV) .cache outputs
