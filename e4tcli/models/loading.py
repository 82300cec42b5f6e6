"""Load a Stable Diffusion base model and a CLIP vision backbone (hub id or local folder)."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e4tcli.errors import UsageError
from e4tcli.io.fingerprint import fingerprint_modules
from e4tcli.models.family import ModelFamily, detect_family

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _quiet_progress_bars() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@dataclass
class BaseModel:
    """The parts of a Stable Diffusion model e4t uses; ``family`` says how its text conditions the UNet."""

    source: str
    family: ModelFamily
    tokenizers: tuple[Any, ...]
    text_encoders: tuple[Any, ...]
    vae: Any
    unet: Any
    scheduler_config: dict
    fingerprint: str

    @property
    def tokenizer(self):
        """The first tokenizer: the one whose vocabulary names words (every family's is CLIP's)."""
        return self.tokenizers[0]

    @property
    def text_encoder(self):
        return self.text_encoders[0]


@dataclass
class Backbone:
    source: str
    model: Any
    processor: Any
    fingerprint: str


def _not_found(kind: str, source: str, error: Exception, flag: str) -> UsageError:
    where = "folder" if Path(source).exists() else "hub id or folder"
    return UsageError(
        f"could not load the {kind} from {where} '{source}' ({type(error).__name__}: {str(error).splitlines()[0][:200]})",
        hint=f"pass {flag} a diffusers/transformers folder or a hub id that is downloaded or reachable",
    )


def load_base_model(source: str, device=None, dtype=None) -> BaseModel:
    """Tokenizer, text encoder, VAE, UNet and scheduler config of a diffusers model.

    Weights are read from safetensors only (``use_safetensors=True``): a
    pickle-based ``.bin`` file is never unpickled.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    dtype = dtype or torch.float32
    _quiet_progress_bars()
    try:
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet")
    except (OSError, ValueError) as error:
        raise _not_found("base model", source, error, "--base-model") from None
    family = detect_family(source, unet_config)
    try:
        tokenizers, text_encoders = family.load_text(source)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True)
        scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, ValueError) as error:
        raise _not_found("base model", source, error, "--base-model") from None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        if tokenizer.model_max_length > 1000:
            tokenizer.model_max_length = text_encoder.config.max_position_embeddings
    # fingerprinted as loaded, before the cast, so every --precision sees the same model
    names = [encoder for _, encoder in family.text_parts]
    fingerprint = fingerprint_modules(unet=unet, **dict(zip(names, text_encoders)))
    for module in (*text_encoders, vae, unet):
        module.requires_grad_(False)
        module.eval()
        module.to(device=device, dtype=dtype)
    return BaseModel(str(source), family, tokenizers, text_encoders, vae, unet, scheduler_config, fingerprint)


def load_backbone(source: str, device=None, dtype=None) -> Backbone:
    """A frozen CLIP vision tower and its image processor."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModel

    _quiet_progress_bars()
    try:
        processor = CLIPImageProcessor.from_pretrained(source)
        model = CLIPVisionModel.from_pretrained(source, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise _not_found("image backbone", source, error, "--backbone") from None
    fingerprint = fingerprint_modules(backbone=model)
    model.requires_grad_(False).eval()
    model.to(device=device, dtype=dtype or torch.float32)
    return Backbone(str(source), model, processor, fingerprint)


def backbone_features(backbone: Backbone, images: list, layers: tuple[int, ...]):
    """The [CLS] token of each chosen backbone layer: (B, len(layers), width), fp32."""
    import torch

    model = backbone.model
    pixels = backbone.processor(images=images, return_tensors="pt").pixel_values
    pixels = pixels.to(device=model.device, dtype=model.dtype)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    return torch.stack([hidden[i][:, 0] for i in layers], dim=1).float()
