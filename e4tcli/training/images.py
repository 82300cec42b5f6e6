"""Image preparation shared by the loops: square crops, pixel tensors, VAE latents."""

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch


def square_resize(image, resolution: int):
    """Centre-crop to a square, then resize to ``resolution`` (Lanczos)."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.LANCZOS)
    return image


def to_pixels(images: list) -> torch.Tensor:
    """RGB PIL images -> (B, 3, H, W) float tensor in [-1, 1]."""
    import numpy as np

    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def mask_to_latent(mask_image, latent_size: int) -> torch.Tensor:
    """A PIL "L" mask -> (1, 1, h, w) weights in [0, 1] at latent resolution."""
    import numpy as np
    from PIL import Image

    small = mask_image.convert("L").resize((latent_size, latent_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None, None]


@contextmanager
def fp32(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in fp32, autocast off, for the duration; back to its dtype after."""
    dtype = next(module.parameters()).dtype
    module.to(torch.float32)
    try:
        with torch.autocast(next(module.parameters()).device.type, enabled=False):
            yield
    finally:
        module.to(dtype)


def latent_distribution(vae, pixels: torch.Tensor, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior, in fp32, scaled by the VAE's scaling factor.

    ``upcast``: an fp16 VAE encodes in fp32 (SDXL's VAE overflows in fp16; its pipeline upcasts it to decode)."""
    with torch.no_grad(), fp32(vae) if upcast and vae.dtype == torch.float16 else nullcontext():
        posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return posterior.mean.float() * scale, posterior.std.float() * scale
