"""Tiny random-weight models in the folder formats of diffusers/transformers.

No real weights can be downloaded here, so tests, the demo and benchmarks run
on small models built from configs. The folders have the same layout as the
real ones (Stable Diffusion 1.x/2.x and XL, a CLIP vision tower), so code written
against ``from_pretrained(folder)`` works on both. The text encoder keeps the
real CLIP vocabulary (49,408 tokens, real special-token ids) and the real
tokenizer (see ``e4tcli.clip_bpe``), so token ids match real checkpoints.

Weights are random but deterministic: ``torch.manual_seed`` runs before each
model is constructed.

Usage: ``python -m e4tcli.tiny OUT_DIR [--sdxl]`` builds OUT_DIR/sd and OUT_DIR/backbone, and with
``--sdxl`` a tiny Stable Diffusion XL folder OUT_DIR/sdxl.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

# Cheap quietness; setdefault leaves a user's explicit choice alone.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CLIP_VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
MAX_TEXT_LENGTH = 77


@contextmanager
def _no_progress_bars():
    """Hide transformers 5's "Writing model shards" bar during a save."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _scheduler(prediction_type: str):
    """The scheduler the real checkpoints ship with.

    SD 1.x (epsilon): PNDM with skip_prk_steps. SD 2.x (v_prediction): DDIM.
    Both use the scaled-linear betas of SD and steps_offset=1.
    """
    from diffusers import DDIMScheduler, PNDMScheduler

    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    if prediction_type == "epsilon":
        return PNDMScheduler(skip_prk_steps=True, **common)
    if prediction_type == "v_prediction":
        return DDIMScheduler(clip_sample=False, **common)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")


def build_tiny_base_model(
    out_dir: str | Path,
    *,
    text_width: int = 32,
    prediction_type: str = "epsilon",
    resolution: int = 64,
    seed: int = 0,
) -> Path:
    """Save a tiny Stable Diffusion folder (unet, vae, text_encoder, tokenizer, scheduler).

    The UNet has two cross-attention down blocks, a cross-attention middle
    block and two cross-attention up blocks (14 attention layers: 7 self, 7
    cross). The VAE downsamples by 8 (64 px -> 8x8x4 latents).
    """
    import torch
    from diffusers import UNet2DConditionModel

    from e4tcli.clip_bpe import write_tokenizer_files

    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=8,
        norm_num_groups=8,
    )

    torch.manual_seed(seed)
    vae = tiny_vae(resolution)

    torch.manual_seed(seed)
    text_encoder = clip_text_encoder(text_width)

    scheduler = _scheduler(prediction_type)
    with _no_progress_bars():
        for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
            model.save_pretrained(out / name, safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    write_tokenizer_files(out / "tokenizer")
    write_model_index(out, type(scheduler).__name__)
    return out


def build_tiny_sdxl(out_dir: str | Path, *, text_width: int = 32, resolution: int = 64, seed: int = 0) -> Path:
    """Save a tiny Stable Diffusion XL folder: two text encoders (the second with a projection, whose
    pooled output and the size/crop time ids condition the UNet through ``added_cond_kwargs``), their two
    tokenizers, a UNet with ``addition_embed_type="text_time"``, the VAE and SDXL's Euler scheduler."""
    import torch
    from diffusers import UNet2DConditionModel

    from e4tcli.clip_bpe import write_tokenizer_files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * text_width,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=text_width + 6 * time_embed_dim,
        norm_num_groups=8,
    )
    torch.manual_seed(seed)
    vae = tiny_vae(resolution)
    torch.manual_seed(seed)
    text_encoder = clip_text_encoder(text_width)
    torch.manual_seed(seed + 1)
    text_encoder_2 = clip_text_encoder(text_width, with_projection=True)
    scheduler = sdxl_scheduler()
    with _no_progress_bars():
        for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
            model.save_pretrained(out / name, safe_serialization=True)
        text_encoder_2.save_pretrained(out / "text_encoder_2", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    write_tokenizer_files(out / "tokenizer")
    write_tokenizer_files(out / "tokenizer_2")
    write_sdxl_model_index(out)
    return out


def sdxl_scheduler():
    """SDXL's scheduler: Euler, scaled-linear betas, epsilon, leading spacing."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def write_sdxl_model_index(out: Path) -> None:
    """``model_index.json`` of a Stable Diffusion XL folder, written by hand as ``write_model_index`` is."""
    import diffusers

    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (Path(out) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def tiny_vae(resolution: int):
    """A small VAE that downsamples by 8, as Stable Diffusion's does (random weights)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )


def clip_text_encoder(width: int, layers: int = 2, with_projection: bool = False):
    """A small CLIP text encoder with the real CLIP vocabulary and special-token ids (random weights);
    ``with_projection``: SDXL's second encoder, whose projected pooled output conditions the UNet."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=MAX_TEXT_LENGTH,
            projection_dim=width,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
        )
    )


def write_model_index(out: Path, scheduler_class: str) -> None:
    """``model_index.json`` of a Stable Diffusion folder (unet, vae, text encoder, tokenizer, scheduler).

    Written by hand rather than by StableDiffusionPipeline.save_pretrained:
    importing the pipeline costs seconds, and its save would turn tokenizer/
    into a tokenizer.json. Unused components are [null, null], as in SD 2.x.
    """
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (Path(out) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_tiny_backbone(out_dir: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """Save a tiny CLIP vision tower plus its image processor config.

    Hidden size 32, 5 layers, patch 8: ``output_hidden_states=True`` gives 6
    hidden states (embeddings + each layer) of shape
    (batch, 1 + (image_size // 8) ** 2, 32); index 0 along dim 1 is CLS.
    """
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of the patch size 8, got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=5,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            projection_dim=32,
        )
    )
    with _no_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    ).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sdxl = "--sdxl" in args
    folders = [a for a in args if a != "--sdxl"]
    if len(folders) != 1 or any(a.startswith("-") for a in folders):
        print("usage: python -m e4tcli.tiny OUT_DIR [--sdxl]", file=sys.stderr)
        return 2
    root = Path(folders[0])
    print(build_tiny_base_model(root / "sd"))
    print(build_tiny_backbone(root / "backbone"))
    if sdxl:
        print(build_tiny_sdxl(root / "sdxl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
