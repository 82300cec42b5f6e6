"""Generation with a concept, wrapping the base model family's diffusers pipeline.

The pipeline does what it always does (classifier-free guidance, the base
model's scheduler, VAE decoding); e4t only supplies the prompt embeddings,
and, through ``callback_on_step_end``, recomputes ``S*`` for every denoising
step (or every K-th: ``encoder_every``) from the current latent, as E4T's
encoder is conditioned on ``z_t``.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from e4tcli.domain import PLACEHOLDER
from e4tcli.models.e4t import E4TModel


@dataclass
class SamplingSettings:
    prompt: str
    negative_prompt: str = ""
    num_images: int = 1
    seed: int = 0
    steps: int = 30
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    encoder_every: int = 1
    """Run the encoder at every K-th denoising step and reuse ``S*`` (and its text states) in between;
    1 is E4T as published. The encoder's pass costs about a third of a guided UNet step."""


def sampling_scheduler(scheduler_config: dict):
    """The base model's own scheduler class, from its config."""
    import diffusers

    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", "PNDMScheduler"), None)
    if scheduler_class is None:
        scheduler_class = diffusers.PNDMScheduler
    return scheduler_class.from_config(scheduler_config)


def build_pipeline(model: E4TModel):
    """The base model's family's diffusers pipeline, drawing with the (offset-wrapped) UNet."""
    pipe = model.family.pipeline(model.base, model.unet, sampling_scheduler(model.base.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_latents(model: E4TModel, settings: SamplingSettings) -> torch.Tensor:
    """One seeded noise tensor per image (seed, seed+1, ...), so each image is reproducible alone."""
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    shape = (1, model.unet.config.in_channels, settings.height // factor, settings.width // factor)
    device = model.placement.device
    noise = [
        torch.randn(shape, generator=torch.Generator(device=device).manual_seed(settings.seed + i), device=device)
        for i in range(settings.num_images)
    ]
    return torch.cat(noise).to(model.unet.dtype)


class Stopped(Exception):
    """Raised by an ``on_step`` callback to abandon the images being denoised."""


@torch.no_grad()
def generate_images(
    model: E4TModel,
    settings: SamplingSettings,
    pipe=None,
    on_step: Optional[Callable[[], None]] = None,
    fixed_concept: Optional[torch.Tensor] = None,
    on_concept: Optional[Callable[[torch.Tensor], None]] = None,
    image_features: Optional[torch.Tensor] = None,
) -> list:
    """``settings.num_images`` images denoised together; image i uses seed ``settings.seed + i`` (its
    noise and its sampler's randomness), so a run split into batches gives the same images.
    ``on_step`` is called after every denoising step (it may raise ``Stopped``).

    ``S*`` is the encoder's output for the current latent at every step, or ``fixed_concept`` (one
    embedding, as an exported concept has); ``on_concept`` sees each step's ``S*`` (images x dim).
    ``image_features``: the reference's backbone features (layers x width), needed only when ``model`` has
    the domain's encoder (pre-training's validation grid); a concept's encoder holds its reference."""
    pipe = pipe or build_pipeline(model)
    device, count = model.placement.device, settings.num_images
    guided = settings.guidance > 1.0
    prompt_ids = model.tokenize([settings.prompt] * count)
    class_ids = model.tokenize([settings.prompt.replace(PLACEHOLDER, model.class_word)] * count)
    class_states = model.encode_text(class_ids)
    negative_states = model.negative_states(settings.negative_prompt, count)
    features = None if image_features is None else image_features.to(device).float().expand(count, -1, -1)

    reused: list[torch.Tensor] = []

    def conditional_states(latents: torch.Tensor, timestep: torch.Tensor, index: int) -> torch.Tensor:
        if reused and (fixed_concept is not None or index % settings.encoder_every):
            return reused[0]
        if fixed_concept is not None:
            concept = fixed_concept.to(device).float().reshape(1, -1).expand(count, -1)
        else:
            timesteps = timestep.reshape(1).expand(count).to(device)
            concept, _ = model.concept_embedding(features, latents.to(model.unet.dtype), timesteps, class_states)
        if on_concept is not None:
            on_concept(concept)
        reused[:] = [model.encode_text(prompt_ids, concept=concept)]
        return reused[0]

    latents = initial_latents(model, settings)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(settings.steps, device=device)
    timesteps = scheduler.timesteps.clone()
    first = conditional_states(
        scheduler.scale_model_input(latents * scheduler.init_noise_sigma, timesteps[0]), timesteps[0], 0
    )

    def on_step_end(pipeline, index, _timestep, tensors):
        if on_step is not None:
            on_step()
        if index + 1 >= len(timesteps):
            return {}
        upcoming = timesteps[index + 1]
        states = conditional_states(
            pipeline.scheduler.scale_model_input(tensors["latents"], upcoming), upcoming, index + 1
        )
        return model.family.step_embeds(torch.cat([negative_states, states]) if guided else states)

    generators = [torch.Generator(device=device).manual_seed(settings.seed + 10_000 + i) for i in range(count)]
    result = pipe(
        **model.family.pipeline_embeds(first, negative_states),
        latents=latents,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        height=settings.height,
        width=settings.width,
        generator=generators,
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=list(model.family.callback_inputs),
        output_type="pil",
    )
    return result.images


GRID_MAX_SIDE = 4096
"""``e4t generate`` scales a grid of many images down to at most this many pixels a side."""


def image_grid(images: Sequence, max_side: Optional[int] = None):
    """The images side by side in a near-square grid. ``images`` are PIL images, or paths, read one at a
    time (memory then does not grow with their number); ``max_side`` scales large grids down."""
    from PIL import Image

    def opened(item):
        if isinstance(item, (str, Path)):
            with Image.open(item) as image:
                return image.convert("RGB")
        return item

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = opened(images[0]).size
    scale = min(1.0, max_side / max(columns * width, rows * height)) if max_side else 1.0
    tile = (max(1, round(width * scale)), max(1, round(height * scale)))
    grid = Image.new("RGB", (columns * tile[0], rows * tile[1]), "white")
    for i, item in enumerate(images):
        image = opened(item)
        grid.paste(image if scale == 1.0 else image.resize(tile), ((i % columns) * tile[0], (i // columns) * tile[1]))
    return grid
