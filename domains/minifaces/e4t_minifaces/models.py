"""Shapes of the miniature world's models: a small Stable-Diffusion-format
text-to-image model, a small CLIP vision tower, and the attribute reader.

The VAE halves the resolution (32 px images, 16x16x4 latents), so the UNet
(3.7 M parameters, attention at 8x8 and 4x4 only) costs about 0.7 s per
batch of 32 on 2 CPU cores.
"""

from __future__ import annotations

import torch
from torch import nn

from e4t_minifaces import world

TEXT_WIDTH = 64


def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=world.RESOLUTION,
        mid_block_add_attention=False,
    )


def new_unet(attention_everywhere: bool = False):
    """``attention_everywhere`` adds cross-attention at 16x16 too (an experiment: does text then reach local features?)."""
    from diffusers import UNet2DConditionModel

    first_down, last_up = (
        ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if attention_everywhere else ("DownBlock2D", "UpBlock2D")
    )
    return UNet2DConditionModel(
        sample_size=world.RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(48, 96, 96),
        layers_per_block=1,
        down_block_types=(first_down, "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", last_up),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def new_text_encoder():
    from e4tcli.tiny import clip_text_encoder

    return clip_text_encoder(TEXT_WIDTH, layers=2)


def new_scheduler():
    """DDIM for sampling (good in 25 steps); training uses DDPM on the same betas."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def new_backbone():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=world.RESOLUTION,
            patch_size=4,
            projection_dim=64,
        )
    )


class AttributeReader(nn.Module):
    """A small CNN with one classification head per attribute (identity and scene).

    The benchmark's judge: it reads what a generated image shows. It is trained
    on generator output with noise and blur, never on any model's output.
    """

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        self.features = nn.Sequential(
            block(3, 32),
            nn.MaxPool2d(2),
            block(32, 64),
            nn.MaxPool2d(2),
            block(64, 128),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(512, len(choices)) for name, choices in world.ALL_CHOICES.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels``: (B, 3, 32, 32) in [-1, 1] -> logits per attribute."""
        hidden = self.features(pixels)
        return {name: head(hidden) for name, head in self.heads.items()}
