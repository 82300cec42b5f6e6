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

# The main job, offline on a CPU: tiny random-weight models stand in for Stable Diffusion
# (no weights can be downloaded here), pre-trained for a few steps, then tune + generate.
DEMO := .cache/demo
demo: $(STAMP)
	$(BIN)/e4t domains
	$(BIN)/python -m e4tcli.tiny $(DEMO)/models
	$(BIN)/python scripts/demo_photos.py $(DEMO)/photos
	$(BIN)/e4t pretrain --domain cats --data $(DEMO)/photos --out $(DEMO)/cats-checkpoint \
	    --base-model $(DEMO)/models/sd --backbone $(DEMO)/models/backbone \
	    --steps 20 --batch-size 4 --resolution 64 --encoder-hidden-dim 64
	$(BIN)/e4t tune $(DEMO)/photos/chelsea.png --domain cats --checkpoint $(DEMO)/cats-checkpoint \
	    --out $(DEMO)/chelsea.safetensors
	$(BIN)/e4t generate $(DEMO)/chelsea.safetensors "S* as an astronaut" --num-images 4 --steps 20 --out outputs

test: $(STAMP)
	$(BIN)/python -m pytest -q

completions: $(STAMP)
	$(BIN)/python scripts/make_completions.py

clean:
	rm -rf $(VENV) .cache outputs
