"""Tuning: a few steps on ONE image, starting from a pre-trained domain checkpoint."""

import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from e4tcli.domain import PLACEHOLDER, plain_templates
from e4tcli.errors import RuntimeFailure
from e4tcli.models.e4t import E4TModel
from e4tcli.models.weight_offsets import offset_parameters, shared_factors
from e4tcli.training.images import latent_distribution, mask_to_latent, square_resize, to_pixels
from e4tcli.training.step import Batch, StepLosses, training_step


@dataclass
class TuneSettings:
    steps: int
    learning_rate: float
    batch_size: int
    resolution: int
    lambda_emb: float
    lambda_weights: float
    seed: int = 0
    weight_decay: float = 0.0
    flip: bool = True
    """Light augmentation: the batch mixes the image and its mirror image."""
    offset_learning_rate: Optional[float] = None
    """The weight offsets' learning rate (default: ``learning_rate``)."""
    bias_learning_rate: Optional[float] = None
    """Also train additive changes to the UNet's biases and normalization parameters at this rate
    (``e4tcli.models.bias_offsets``): from the model's (a domain checkpoint's), else from zero; None: the
    model's are kept as they are, and none are added."""
    additive_rank: int = 0
    """Also train an additive rank-``additive_rank`` change to every weight the offsets modulate, from zero
    (``e4tcli.models.additive_changes``); 0: none."""
    additive_learning_rate: Optional[float] = None
    """The additive changes' rate (default: ``learning_rate``)."""


def optimizer_for(
    model: E4TModel,
    learning_rate: float,
    weight_decay: float,
    offset_learning_rate: Optional[float] = None,
    bias_learning_rate: Optional[float] = None,
    additive: Optional[tuple[list[torch.nn.Parameter], float]] = None,
) -> torch.optim.Optimizer:
    """AdamW over the encoder and the weight offsets, constant learning rates (the offsets' own, if given),
    over the model's bias changes at ``bias_learning_rate`` when given, and over ``additive``'s parameters
    at its rate, without weight decay (they start at zero and are the concept's own)."""
    if offset_learning_rate is None:
        groups: list = [{"params": model.trainable_parameters()}]
    else:
        groups = [
            {"params": list(model.encoder.parameters())},
            {"params": list(offset_parameters(model.offsets)), "lr": offset_learning_rate},
        ]
    if bias_learning_rate is not None and model.biases is not None:
        groups.append({"params": list(model.biases.parameters()), "lr": bias_learning_rate})
    if additive is not None and additive[0]:
        parameters, rate = additive
        groups.append({"params": parameters, "lr": rate, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay, **fastest_adamw(model))


def fastest_adamw(model: E4TModel) -> dict[str, bool]:
    """The fused AdamW kernel where torch has one: the paper's offsets hold d x d maps (152 M values at
    SD 1.5 shapes), and on a CPU fused AdamW steps them four times as fast as the per-tensor loop."""
    return {"fused": True} if model.placement.device.type in ("cpu", "cuda") else {"foreach": True}


def check_finite(losses: StepLosses, step: int) -> None:
    if not torch.isfinite(losses.total):
        raise RuntimeFailure(
            f"the loss became {float(losses.total.detach())} at step {step}; nothing was written",
            hint="lower --lr, or use --precision fp32",
        )


def tune_concept(
    model: E4TModel,
    image,
    image_features: torch.Tensor,
    prompt_templates: tuple[str, ...],
    settings: TuneSettings,
    noise_scheduler,
    loss_mask=None,
    on_step: Optional[Callable[[int, StepLosses], None]] = None,
) -> list[dict[str, float]]:
    """Optimise the encoder and the offsets on ``image``; return each step's losses.

    The batch is the one image under different noise, timesteps, prompt
    templates and (with ``flip``) mirroring; the VAE posterior of each view is
    computed once and sampled at every step.
    """
    prompt_templates = plain_templates(prompt_templates)
    device = model.placement.device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)

    view = square_resize(image, settings.resolution)
    views = [view] + ([view.transpose(0)] if settings.flip else [])
    mean, std = latent_distribution(model.vae, to_pixels(views), model.family.vae_upcast)
    masks = None
    if loss_mask is not None:
        mask_view = square_resize(loss_mask, settings.resolution)
        mask_views = [mask_view] + ([mask_view.transpose(0)] if settings.flip else [])
        masks = torch.cat([mask_to_latent(m, mean.shape[-1]) for m in mask_views]).to(device)
    features = image_features.to(device).float()
    class_prompts = [template.replace(PLACEHOLDER, model.class_word) for template in prompt_templates]
    with torch.no_grad(), model.placement.autocast:
        class_states = dict(zip(prompt_templates, model.encode_text(model.tokenize(class_prompts))))

    if settings.bias_learning_rate is not None:
        model.start_bias_offsets()
    if model.biases is not None:
        model.biases.requires_grad_(settings.bias_learning_rate is not None)  # a checkpoint's, kept as they are
    tunes_additive = settings.additive_rank > 0 and settings.steps > 0  # untuned, they would be zeros
    additive = model.start_additive_changes(settings.additive_rank) if tunes_additive else []
    additive_rate = settings.additive_learning_rate
    optimizer = optimizer_for(
        model,
        settings.learning_rate,
        settings.weight_decay,
        settings.offset_learning_rate,
        settings.bias_learning_rate,
        (additive, settings.learning_rate if additive_rate is None else additive_rate),
    )
    # fp16 activations need loss scaling so small gradients do not underflow (bf16 and fp32 do not).
    scaler = torch.amp.GradScaler(device.type, enabled=model.placement.dtype == torch.float16)
    history = []
    for step in range(1, settings.steps + 1):
        choice = torch.randint(0, len(views), (settings.batch_size,), generator=generator, device=device)
        latents = mean[choice] + std[choice] * torch.randn(mean[choice].shape, generator=generator, device=device)
        prompts = [rng.choice(prompt_templates) for _ in range(settings.batch_size)]
        batch = Batch(
            latents=latents,
            image_features=features.expand(settings.batch_size, -1, -1),
            prompt_ids=model.tokenize(prompts),
            class_prompt_ids=model.tokenize([p.replace(PLACEHOLDER, model.class_word) for p in prompts]),
            class_states=torch.stack([class_states[p] for p in prompts]),
            loss_mask=None if masks is None else masks[choice],
        )
        optimizer.zero_grad(set_to_none=True)
        with shared_factors(model.offsets):
            losses = training_step(
                model, batch, noise_scheduler, settings.lambda_emb, settings.lambda_weights, generator
            )
            check_finite(losses, step)
            scaler.scale(losses.total).backward()
        scaler.step(optimizer)
        scaler.update()
        history.append(losses.as_floats())
        if on_step is not None:
            on_step(step, losses)
    return history
