"""One fixed word embedding for a concept, for tools that have no E4T encoder.

E4T's encoder computes ``S*`` afresh at every denoising step from the noisy
latent. A textual-inversion file holds one vector, so export draws a few images
of the concept with e4t's own sampler and averages the ``S*`` it computed over
every step of every image: the embedding the encoder gives along the
trajectories the concept is actually drawn on.
"""

from dataclasses import dataclass

from e4tcli.domain import PLACEHOLDER


@dataclass
class EmbeddingSettings:
    images: int = 4
    """Trajectories averaged over (seeds 0, 1, ...)."""
    steps: int = 30
    guidance: float = 7.5
    prompt: str = f"a photo of {PLACEHOLDER}"
    steps_averaged: str = "all"
    """Which denoising steps' ``S*`` are averaged: "all", "early" (the noisier first half) or "late"."""


STEP_CHOICES = ("all", "early", "late")


def fixed_embedding(model, resolution: int, settings: EmbeddingSettings):
    """The mean of the encoder's ``S*`` over ``settings.images`` trajectories and their steps (dim,)."""
    import torch

    from e4tcli.pipeline import SamplingSettings, generate_images

    if settings.steps_averaged not in STEP_CHOICES:
        raise ValueError(f"steps_averaged must be one of {STEP_CHOICES}, not {settings.steps_averaged!r}")
    seen = []
    sampling = SamplingSettings(
        prompt=settings.prompt,
        num_images=settings.images,
        seed=0,
        steps=settings.steps,
        guidance=settings.guidance,
        height=resolution,
        width=resolution,
    )
    generate_images(model, sampling, on_concept=lambda concept: seen.append(concept.detach().float().cpu()))
    half = len(seen) // 2
    chosen = {"all": seen, "early": seen[: max(1, half)], "late": seen[half:]}[settings.steps_averaged]
    return torch.cat(chosen).mean(dim=0)
