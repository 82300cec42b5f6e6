"""Pre-training a domain: underfit many concepts, each training image its own concept."""

import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from e4tcli.domain import PLACEHOLDER
from e4tcli.models.e4t import E4TModel
from e4tcli.models.loading import Backbone, backbone_features
from e4tcli.training.images import latent_distribution, square_resize, to_pixels
from e4tcli.training.step import Batch, StepLosses, training_step
from e4tcli.training.tune import check_finite, optimizer_for


@dataclass
class PretrainSettings:
    steps: int
    learning_rate: float
    batch_size: int
    resolution: int
    lambda_emb: float
    lambda_weights: float
    seed: int = 0
    weight_decay: float = 0.0
    flip: bool = True


def pretrain_domain(
    model: E4TModel,
    backbone: Backbone,
    dataset: Sequence,
    prompt_templates: tuple[str, ...],
    settings: PretrainSettings,
    noise_scheduler,
    preprocess: Optional[Callable] = None,
    on_step: Optional[Callable[[int, StepLosses], None]] = None,
) -> list[dict[str, float]]:
    """Train the encoder and the shared offsets on ``dataset``; return each step's losses."""
    device = model.placement.device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    optimizer = optimizer_for(model, settings.learning_rate, settings.weight_decay)
    layers = model.encoder_config.backbone_layers
    history = []
    for step in range(1, settings.steps + 1):
        images = []
        for _ in range(settings.batch_size):
            image = dataset[rng.randrange(len(dataset))]
            image = square_resize(preprocess(image) if preprocess else image, settings.resolution)
            images.append(image.transpose(0) if settings.flip and rng.random() < 0.5 else image)
        mean, std = latent_distribution(model.vae, to_pixels(images))
        latents = mean + std * torch.randn(mean.shape, generator=generator, device=device)
        prompts = [rng.choice(prompt_templates) for _ in images]
        batch = Batch(
            latents=latents,
            image_features=backbone_features(backbone, images, layers),
            prompt_ids=model.tokenize(prompts),
            class_prompt_ids=model.tokenize([p.replace(PLACEHOLDER, model.class_word) for p in prompts]),
        )
        losses = training_step(model, batch, noise_scheduler, settings.lambda_emb, settings.lambda_weights, generator)
        check_finite(losses, step)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()
        history.append(losses.as_floats())
        if on_step is not None:
            on_step(step, losses)
    return history
