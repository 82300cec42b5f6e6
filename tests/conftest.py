"""Shared pytest fixtures.

The tiny models are built once per test session, and only when a test asks
for them (building the SD folder costs ~1-3 s plus ~5 s of torch/diffusers
imports), so tests that don't need torch never pay for it.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never contacts the Hugging Face Hub
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the cores: one thread each (and in each process a test starts), not one per core.
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def fresh_registry():
    """Each test sees the plugins installed at that moment (tests add fake ones)."""
    from e4tcli.cli.output import reset_registry

    reset_registry()
    yield
    reset_registry()


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Path of a tiny epsilon-prediction Stable Diffusion folder (64 px, text width 32)."""
    from e4tcli.tiny import build_tiny_base_model

    return build_tiny_base_model(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    """Path of a tiny v-prediction Stable Diffusion folder (SD 2.x-style DDIM scheduler)."""
    from e4tcli.tiny import build_tiny_base_model

    folder = tmp_path_factory.mktemp("tiny") / "sd_v"
    return build_tiny_base_model(folder, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Path of a tiny Stable Diffusion XL folder (64 px, two text encoders of width 32)."""
    from e4tcli.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """Path of a tiny CLIP vision tower folder (32 px input, 5 layers, hidden 32)."""
    from e4tcli.tiny import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("tiny") / "backbone")


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """A small folder of real photos shipped with scikit-image (a cat, a face, ...)."""
    import skimage.data
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "astronaut", "coffee", "rocket", "cat"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="session")
def cats_domain():
    from e4tcli.plugins import load_registry

    return load_registry().get("cats").domain


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_sd, tiny_backbone, photo_folder, cats_domain):
    """A cats-domain checkpoint pre-trained for 2 steps on the tiny model."""
    from e4tcli import api

    out = tmp_path_factory.mktemp("ckpt") / "cats"
    options = api.PretrainOptions(
        data=str(photo_folder),
        out=str(out),
        base_model=str(tiny_sd),
        backbone=str(tiny_backbone),
        steps=2,
        batch_size=2,
        resolution=64,
        encoder_hidden_dim=64,
    )
    api.pretrain(options, cats_domain)
    return out


@pytest.fixture
def pretrain_args(tiny_sd, tiny_backbone, photo_folder):
    """`e4t pretrain` arguments for the cats domain on the tiny models, on the CPU."""
    return [
        "--domain",
        "cats",
        "--data",
        str(photo_folder),
        "--base-model",
        str(tiny_sd),
        "--backbone",
        str(tiny_backbone),
        "--batch-size",
        "2",
        "--resolution",
        "64",
        "--encoder-hidden-dim",
        "32",
        "--device",
        "cpu",
    ]
