"""The one training step shared by pre-training and tuning.

loss = ||prediction - target||^2                    (epsilon or v, as the base scheduler predicts)
     + lambda_emb * ||offset||^2                    (the encoder's word-embedding offset)
     + lambda_weights * sum over layers ||dW||_F^2  (the weight offsets)
"""

from dataclasses import dataclass
from typing import Optional

import torch

from e4tcli.models.e4t import E4TModel


@dataclass
class Batch:
    latents: torch.Tensor
    """Clean VAE latents, already multiplied by the VAE's scaling factor: (B, C, h, w)."""
    image_features: torch.Tensor
    """Backbone [CLS] features of the reference image of each element: (B, layers, width)."""
    prompt_ids: torch.Tensor
    """Token ids of prompts containing S*: (B, 77)."""
    class_prompt_ids: torch.Tensor
    """The same prompts with the class word in place of S* (input of the encoder's UNet pass)."""
    class_states: Optional[torch.Tensor] = None
    """The text encoder's output for ``class_prompt_ids``, when the caller has it (tuning draws its prompts
    from a few templates and encodes each once); computed here otherwise."""
    loss_mask: Optional[torch.Tensor] = None
    """Optional (B, 1, h, w) weights of the noise-prediction loss, e.g. the face region."""
    noise: Optional[torch.Tensor] = None
    timesteps: Optional[torch.Tensor] = None
    """Noise and timesteps may be drawn by the caller (per-sample seeds make multi-process
    runs reproduce single-process ones); otherwise they are drawn from ``generator``."""


@dataclass
class StepLosses:
    total: torch.Tensor
    denoising: torch.Tensor
    embedding: torch.Tensor
    weights: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


def diffusion_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type '{prediction_type}' (epsilon and v_prediction are)")


def training_step(
    model: E4TModel,
    batch: Batch,
    noise_scheduler,
    lambda_emb: float,
    lambda_weights: float,
    generator: Optional[torch.Generator] = None,
) -> StepLosses:
    latents = batch.latents
    device = latents.device
    noise = batch.noise
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    timesteps = batch.timesteps
    if timesteps is None:
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=device
        )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    unet_dtype = model.unet.dtype

    with model.placement.autocast:
        class_states = batch.class_states
        if class_states is None:
            with torch.no_grad():
                class_states = model.encode_text(batch.class_prompt_ids)
        concept, offset = model.concept_embedding(batch.image_features, noisy.to(unet_dtype), timesteps, class_states)
        text_states = model.encode_text(batch.prompt_ids, concept=concept)
        prediction = model.denoise(noisy.to(unet_dtype), timesteps, text_states)
    weights = model.offsets_squared_norm()
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    squared_error = (prediction.float() - target.float()) ** 2
    if batch.loss_mask is not None:
        mask = batch.loss_mask.to(squared_error.dtype).expand_as(squared_error)
        denoising = (squared_error * mask).sum() / mask.sum().clamp(min=1e-8)
    else:
        denoising = squared_error.mean()
    embedding = offset.pow(2).sum(dim=-1).mean()
    total = denoising + lambda_emb * embedding + lambda_weights * weights
    return StepLosses(total, denoising, embedding, weights)
