"""The E4T encoder: (reference image, noisy latent, timestep) -> word-embedding offset.

Inputs are the [CLS] tokens of every 2nd layer of a frozen CLIP vision tower
(computed once per image) and the UNet's down-block and mid-block outputs for
the current noisy latent, spatially mean-pooled (computed at every step).

Choices where the paper is silent, all in ``EncoderConfig``:
- each backbone layer's [CLS] goes through its own linear map to
  ``hidden_dim``; the results are averaged over the hierarchy, then LeakyReLU;
- the pooled UNet features are concatenated, mapped by one linear layer to
  ``hidden_dim``, then LeakyReLU;
- the two are concatenated and a two-layer MLP head produces the offset; its
  last layer is zero-initialised, so a fresh encoder yields exactly the class
  word's embedding;
- the UNet features are taken without gradient (they are inputs to the
  encoder, not a path for training the UNet offsets).
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EncoderConfig:
    backbone_hidden_size: int
    backbone_layers: tuple[int, ...]
    """Indices into the backbone's ``hidden_states`` (0 is the patch embedding)."""
    unet_channels: tuple[int, ...]
    """Channels of each pooled UNet feature: every down block, then the mid block."""
    embedding_dim: int
    """Width of the text encoder's token embeddings (768 for SD 1.x, 1024 for SD 2.x)."""
    hidden_dim: int = 768
    scale: float = 0.1
    """s in ``S* = emb(class word) + s * offset``."""
    negative_slope: float = 0.01

    @classmethod
    def from_dict(cls, data: dict) -> "EncoderConfig":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @staticmethod
    def every_second_layer(num_layers: int) -> tuple[int, ...]:
        return tuple(range(2, num_layers + 1, 2))


class E4TEncoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_dim
        self.image_layers = nn.ModuleList(
            nn.Linear(config.backbone_hidden_size, hidden) for _ in config.backbone_layers
        )
        self.unet_layer = nn.Linear(sum(config.unet_channels), hidden)
        self.activation = nn.LeakyReLU(config.negative_slope)
        self.head = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.LeakyReLU(config.negative_slope), nn.Linear(hidden, config.embedding_dim)
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def reference_code(self, image_features: torch.Tensor) -> torch.Tensor:
        """The part of the head's first layer that depends on the reference alone: (B, hidden_dim).

        A concept stores this vector instead of the image branch (see ``ConceptEncoder``)."""
        per_layer = [layer(image_features[:, i]) for i, layer in enumerate(self.image_layers)]
        image = self.activation(torch.stack(per_layer).mean(0))
        first = self.head[0]
        return nn.functional.linear(image, first.weight[:, : self.config.hidden_dim], first.bias)

    def from_reference_code(self, code: torch.Tensor, unet_features: torch.Tensor) -> torch.Tensor:
        denoiser = self.activation(self.unet_layer(unet_features))
        hidden = code + nn.functional.linear(denoiser, self.head[0].weight[:, self.config.hidden_dim :])
        return self.head[2](self.activation(hidden))

    def forward(self, image_features: torch.Tensor, unet_features: torch.Tensor) -> torch.Tensor:
        """``image_features`` (B, layers, backbone width), ``unet_features`` (B, sum of channels) -> (B, embedding_dim)."""
        return self.from_reference_code(self.reference_code(image_features), unet_features)


class ConceptEncoder(nn.Module):
    """The tuned encoder of one concept, with its reference folded in.

    The image branch and the image half of the head's first layer see only the
    reference, which is fixed once tuned; they collapse into one vector
    (``reference``), so a concept needs neither the image-branch weights (three
    quarters of the encoder at SD 1.5 + ViT-H/14 shapes) nor the backbone
    features. What stays reads the noisy latent at every step. The result
    equals ``E4TEncoder`` on that reference up to float rounding.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_dim
        self.unet_layer = nn.Linear(sum(config.unet_channels), hidden)
        self.activation = nn.LeakyReLU(config.negative_slope)
        self.register_buffer("reference", torch.zeros(hidden))
        self.denoiser = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, config.embedding_dim)

    @classmethod
    @torch.no_grad()
    def fold(cls, encoder: E4TEncoder, image_features: torch.Tensor) -> "ConceptEncoder":
        """``encoder`` on one reference (``image_features``: (layers, backbone width) or (1, layers, width))."""
        folded = cls(encoder.config).to(encoder.head[0].weight.device)
        features = image_features.reshape(1, *image_features.shape[-2:]).to(folded.reference.device).float()
        folded.reference.copy_(encoder.reference_code(features)[0])
        folded.unet_layer.load_state_dict(encoder.unet_layer.state_dict())
        folded.denoiser.weight.copy_(encoder.head[0].weight[:, encoder.config.hidden_dim :])
        folded.out.load_state_dict(encoder.head[2].state_dict())
        return folded

    def forward(self, unet_features: torch.Tensor) -> torch.Tensor:
        """``unet_features`` (B, sum of channels) -> (B, embedding_dim)."""
        denoiser = self.activation(self.unet_layer(unet_features))
        return self.out(self.activation(self.reference + self.denoiser(denoiser)))
