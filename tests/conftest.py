"""Shared pytest fixtures.

The tiny models are built once per test session, and only when a test asks
for them (building the SD folder costs ~1-3 s plus ~5 s of torch/diffusers
imports), so tests that don't need torch never pay for it.
"""

from __future__ import annotations

import pytest


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
def tiny_backbone(tmp_path_factory):
    """Path of a tiny CLIP vision tower folder (32 px input, 5 layers, hidden 32)."""
    from e4tcli.tiny import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("tiny") / "backbone")
