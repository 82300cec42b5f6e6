"""Weight offsets on the UNet's attention projections: ``W' = W * (1 + dW)``.

Each q, k and v projection of every self- and cross-attention layer is
wrapped, the way peft wraps layers: the wrapper keeps ``base_layer`` frozen
and untouched and adds the offset at forward time.

``layers="attention+resnets"`` also wraps the two 3x3 convolutions of every
ResNet block, with ``dW`` (out x in channels) shared by the kernel's taps. The
paper offsets attention only, which suits Stable Diffusion, where attention
carries much of what makes a subject itself; in a small UNet with little
attention (the miniature world's) the convolutions carry it.

Two parameterisations of ``dW`` (out x in) are offered:

``paper`` (default) follows E4T: learned constants ``c`` go through two linear
maps to a column vector ``u = A c`` (length out) and a row vector ``v = B c``
(length in); their outer product ``u v^T`` then goes through a column-wise
linear map ``P`` and a row-wise linear map ``Q``: ``dW = P (u v^T) Q^T``. We
compute it as ``(P u)(Q v)^T``, which is the same matrix at O(d^2) instead of
O(d^3) cost. ``P`` starts as the identity and ``Q`` (the final map) at zero,
so at step 0 the model is exactly the base model.

``lowrank`` is the memory-light option: ``dW = U V^T`` with rank r, ``U``
zero-initialised. It trains far fewer parameters and no d x d maps.

Either way ``dW`` is a product of two thin factors, so a tuned concept stores
only the factors (``factors()``), never a d x d matrix.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from e4tcli.domain import OFFSET_KINDS, OFFSET_LAYERS
from e4tcli.models.additive_changes import AdditiveChange

TARGETS = ("to_q", "to_k", "to_v")
RESNET_TARGETS = ("conv1", "conv2")


@dataclass
class OffsetConfig:
    kind: str = "paper"
    """"paper" (the E4T column/row construction) or "lowrank"."""
    constant_dim: int = 64
    """Length of the learned constant vector (paper kind)."""
    rank: int = 4
    """Rank of dW (lowrank kind)."""
    layers: str = "attention"
    """Which layers get offsets: "attention" (q, k, v; the paper) or "attention+resnets" (also the ResNet convolutions)."""

    def __post_init__(self):
        if self.kind not in OFFSET_KINDS:
            raise ValueError(f"unknown weight-offset kind '{self.kind}'; use one of: {', '.join(OFFSET_KINDS)}")
        if self.layers not in OFFSET_LAYERS:
            raise ValueError(f"unknown weight-offset layers '{self.layers}'; use one of: {', '.join(OFFSET_LAYERS)}")


OFFSET_CLASSES: dict[str, type[nn.Module]] = {}
"""Offset kind -> its module class; the names users may choose are ``e4tcli.domain.OFFSET_KINDS``
(torch-free), which a test keeps equal to these keys. A new kind is one class with ``build`` and ``factors``."""


def offset_kind(name: str):
    def register(cls):
        OFFSET_CLASSES[name] = cls
        return cls

    return register


@offset_kind("paper")
class PaperOffset(nn.Module):
    @classmethod
    def build(cls, config: "OffsetConfig", out_features: int, in_features: int) -> "PaperOffset":
        return cls(out_features, in_features, config.constant_dim)

    def __init__(self, out_features: int, in_features: int, constant_dim: int):
        super().__init__()
        self.constant = nn.Parameter(torch.randn(constant_dim) / math.sqrt(constant_dim))
        self.to_column = nn.Linear(constant_dim, out_features, bias=False)
        self.to_row = nn.Linear(constant_dim, in_features, bias=False)
        self.column_map = nn.Linear(out_features, out_features, bias=False)
        self.row_map = nn.Linear(in_features, in_features, bias=False)
        with torch.no_grad():
            self.column_map.weight.copy_(torch.eye(out_features))
            self.row_map.weight.zero_()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        column = self.column_map(self.to_column(self.constant))
        row = self.row_map(self.to_row(self.constant))
        return column[:, None], row[:, None]


@offset_kind("lowrank")
class LowRankOffset(nn.Module):
    @classmethod
    def build(cls, config: "OffsetConfig", out_features: int, in_features: int) -> "LowRankOffset":
        return cls(out_features, in_features, config.rank)

    def __init__(self, out_features: int, in_features: int, rank: int):
        super().__init__()
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.down = nn.Parameter(torch.randn(in_features, rank) / math.sqrt(in_features))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.up, self.down


class FixedOffset(nn.Module):
    """Offsets as stored in a concept file: the two factors, not trained further."""

    def __init__(self, column: torch.Tensor, row: torch.Tensor):
        """Factors stored in fp16 are widened: ``W * (1 + dW)`` is formed in fp32, then cast."""
        super().__init__()
        self.register_buffer("column", column.float())
        self.register_buffer("row", row.float())
        self._merged: dict = {}

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.column, self.row

    def merged_weight(
        self, weight: torch.Tensor, dtype: torch.dtype, additive: Optional[AdditiveChange] = None
    ) -> torch.Tensor:
        """``W * (1 + dW)`` (``+ U V^T`` with a concept's ``additive`` change) in ``dtype``, formed once: a
        concept's factors never change during generation."""
        key = (dtype, weight.device, weight.data_ptr(), None if additive is None else additive.identity())
        if key not in self._merged:
            self._merged.clear()
            with torch.no_grad():
                merged = modulate(weight.to(self.column.dtype), self.column @ self.row.T)
                if additive is not None:
                    merged = merged + additive.change(weight.shape)
                self._merged[key] = merged.to(dtype)
        return self._merged[key]


def modulate(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W * (1 + dW)``; a convolution's ``dW`` (out x in) applies to every tap of its kernel."""
    delta = delta.reshape(delta.shape + (1,) * (weight.dim() - delta.dim()))
    return weight + weight * delta


def make_offset(config: OffsetConfig, out_features: int, in_features: int) -> nn.Module:
    return OFFSET_CLASSES[config.kind].build(config, out_features, in_features)


class OffsetLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is modulated element-wise by ``1 + dW`` (and, where the concept
    has one, changed by ``additive``: ``e4tcli.models.additive_changes``)."""

    def __init__(self, base_layer: nn.Linear, offset: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.offset = offset
        self.additive: Optional[AdditiveChange] = None
        self.shared: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shared if self.shared is not None else self.offset.factors()

    def delta(self) -> torch.Tensor:
        column, row = self.factors()
        return column @ row.T

    def squared_norm(self) -> torch.Tensor:
        """``||dW||_F^2`` computed from the factors, without forming dW."""
        column, row = self.factors()
        return ((column.T @ column) * (row.T @ row)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (W * (1 + dW) + U V^T)^T + b`` (``U V^T``: the additive change, where the layer has one), the
        weight formed in fp32, then cast to x's dtype.

        In fp16/bf16 an offset smaller than the format's resolution rounds away,
        exactly as the base weights' own rounding does; training keeps dW in fp32.
        """
        bias = self.base_layer.bias
        return self.apply_weight(x, self.modulated_weight(x.dtype), None if bias is None else bias.to(x.dtype))

    def modulated_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(self.offset, FixedOffset) and self.shared is None:
            return self.offset.merged_weight(self.base_layer.weight, dtype, self.additive)
        delta = self.delta()
        weight = modulate(self.base_layer.weight.to(delta.dtype), delta)
        if self.additive is not None:
            weight = weight + self.additive.change(weight.shape)
        return weight.to(dtype)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(x, weight, bias)


class OffsetConv2d(OffsetLinear):
    """A frozen ``nn.Conv2d`` whose weight is modulated channel-pair-wise by ``1 + dW``."""

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self.base_layer._conv_forward(x, weight, bias)  # the layer's own stride, padding (and mode), groups


def _offset_targets(unet: nn.Module, layers: str) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module name, module, attribute)`` of every layer that gets an offset."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    for name, module in list(unet.named_modules()):
        if isinstance(module, Attention):
            yield from ((name, module, target) for target in TARGETS)
        elif layers == "attention+resnets" and isinstance(module, ResnetBlock2D):
            yield from ((name, module, target) for target in RESNET_TARGETS)


def add_weight_offsets(
    unet: nn.Module, config: OffsetConfig, fixed: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> dict[str, OffsetLinear]:
    """Wrap the layers ``config.layers`` names (q, k, v of every attention layer, ...) in place; return the wrappers by name.

    With ``fixed`` (layer name -> stored factors), offsets are built from the
    factors of a concept file instead of as trainable parameters.
    """
    wrapped = {}
    for name, module, target in _offset_targets(unet, config.layers):
        base = getattr(module, target)
        if isinstance(base, OffsetLinear):
            base = base.base_layer
        key = f"{name}.{target}"
        if fixed is None:
            out_features, in_features = base.weight.shape[:2]
            offset = make_offset(config, out_features, in_features)
        elif key in fixed:
            offset = FixedOffset(*fixed[key])
        else:
            raise KeyError(key)
        wrapper = OffsetConv2d if isinstance(base, nn.Conv2d) else OffsetLinear
        layer = wrapper(base, offset.to(base.weight.device))
        setattr(module, target, layer)
        wrapped[key] = layer
    if not wrapped:
        raise ValueError("the UNet has no attention layers to put weight offsets on")
    return wrapped


@contextmanager
def shared_factors(layers: dict[str, OffsetLinear]) -> Iterator[None]:
    """Compute every layer's factors once and reuse them inside the block.

    A training step runs the UNet twice (the encoder's feature pass and the
    denoising pass) and the regulariser once; without sharing, each would
    recompute the paper offsets' d x d maps. The block must also cover the
    backward pass: gradient checkpointing re-runs the forward there and must
    see the same operations.
    """
    share_factors(layers)
    try:
        yield
    finally:
        unshare_factors(layers)


def share_factors(layers: dict[str, OffsetLinear]) -> None:
    """The first half of ``shared_factors``: for a wrapper (FSDP) that holds the whole
    parameters only inside its forward, call this there and ``unshare_factors`` after backward."""
    for layer in layers.values():
        layer.shared = layer.offset.factors()


def unshare_factors(layers: dict[str, OffsetLinear]) -> None:
    for layer in layers.values():
        layer.shared = None


def offset_parameters(layers: dict[str, OffsetLinear]) -> Iterator[nn.Parameter]:
    for layer in layers.values():
        yield from layer.offset.parameters()


def offsets_squared_norm(layers: dict[str, OffsetLinear]) -> torch.Tensor:
    return torch.stack([layer.squared_norm() for layer in layers.values()]).sum()
