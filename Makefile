# Two commands for a fresh clone:  make demo  (the main job)   make test  (the test suite)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-tiny minifaces test test-fast lint completions clean

# CPU-only machines get the pinned CPU build of torch first, so no multi-GB CUDA build is pulled.
$(STAMP): pyproject.toml domains/faces/pyproject.toml domains/cats/pyproject.toml domains/art/pyproject.toml \
          domains/minifaces/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e . -e domains/faces -e domains/cats -e domains/art -e domains/minifaces
	$(BIN)/pip install -q --no-deps clip-anytorch
	touch $(STAMP)

# What only the test suite needs (pytest, and every optional extra: bitsandbytes, lmdb, tensorboard).
TEST_STAMP := $(VENV)/.test-installed
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[test]"
	touch $(TEST_STAMP)

# DeepSpeed for the ZeRO tests (only `make test` needs it), beside the torch already installed: its
# build would otherwise pull a CUDA torch into an isolated environment. Its CPU communication op is
# compiled here, once (about a minute), rather than inside the first test that launches it.
DEEPSPEED_STAMP := $(VENV)/.deepspeed
DEEPSPEED_DEPS  := einops hjson msgpack ninja numpy packaging psutil py-cpuinfo pydantic tqdm
$(DEEPSPEED_STAMP): $(TEST_STAMP)
	$(BIN)/pip install -q $(DEEPSPEED_DEPS)
	$(BIN)/pip install -q --no-build-isolation --no-deps deepspeed==0.19.8
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(DEEPSPEED_STAMP)

# The main job, offline on a CPU, in seconds: personalize the shipped miniature world's model
# to one example portrait (a face it never saw), then draw that face in new scenes.
DEMO    := .cache/demo
EXAMPLE := domains/minifaces/e4t_minifaces/examples/mira.png
demo: $(STAMP)
	$(BIN)/e4t tune $(EXAMPLE) --domain minifaces --out $(DEMO)/mira.safetensors --force
	$(BIN)/e4t generate $(DEMO)/mira.safetensors "a S* on a red background" --num-images 4 --out outputs/red --force
	$(BIN)/e4t generate $(DEMO)/mira.safetensors "a S* on a yellow background, on the left" --num-images 4 --out outputs/yellow --force

# The Stable Diffusion code path on tiny random-weight models (the pictures are noise):
# pre-train a cats checkpoint for 20 steps, tune it on one photo, generate.
demo-tiny: $(STAMP)
	$(BIN)/python -m e4tcli.tiny $(DEMO)/models
	$(BIN)/python scripts/demo_photos.py $(DEMO)/photos
	$(BIN)/e4t pretrain --domain cats --data $(DEMO)/photos --out $(DEMO)/cats-checkpoint \
	    --base-model $(DEMO)/models/sd --backbone $(DEMO)/models/backbone \
	    --steps 20 --batch-size 4 --resolution 64 --encoder-hidden-dim 64 --force
	$(BIN)/e4t tune $(DEMO)/photos/chelsea.png --domain cats --checkpoint $(DEMO)/cats-checkpoint \
	    --out $(DEMO)/chelsea.safetensors --force
	$(BIN)/e4t generate $(DEMO)/chelsea.safetensors "S* as an astronaut" --num-images 4 --steps 20 --out outputs/tiny --force

# Rebuild the miniature world's shipped weights from scratch (about 130 min on 2 CPU cores).
minifaces: $(STAMP)
	$(BIN)/python -m e4t_minifaces.build --work .cache/minifaces-build

# Two workers (pytest-xdist), each taking whole test files: much of the suite is one thread at a time (each
# process a test starts spends about 12 s importing torch and diffusers), so on 2 cores two workers take about
# two thirds of one's time (7:43 against 12:02, DeepSpeed's tests left out of both).
test: lint $(TEST_STAMP) $(DEEPSPEED_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Everyday work: the suite without the tests marked slow (multi-process, DeepSpeed, minifaces quality).
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

completions: $(STAMP)
	$(BIN)/python scripts/make_completions.py

clean:
	rm -rf $(VENV) .cache outputs
