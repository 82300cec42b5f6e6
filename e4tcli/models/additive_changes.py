"""Additive low-rank changes to the weights the offsets modulate, tuned per concept: ``W * (1 + dW) + U V^T``.

The weight offsets only rescale a weight, element by element (a convolution's whole kernel by one factor
per channel pair): they cannot give a weight a direction it lacks. Whole-UNet fine-tuning can, and on
minifaces that is where DreamBooth carries what five offset steps leave out (hair colour, hair style, eye
spacing; docs/minifaces.md, "Additive weight changes"). ``U`` starts at zero, so tuning starts from the
domain's model exactly; ``V`` starts random. A convolution's change covers its whole kernel:
``V`` has one row per input value of an output channel (in x kh x kw).
"""

import math
from typing import Optional

import torch
from torch import nn

from e4tcli.io.concept import ADDITIVE_PREFIX as PREFIX


class AdditiveChange(nn.Module):
    """``U V^T`` for one layer: trainable parameters while tuning, fixed values from a concept file."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, trainable: bool):
        super().__init__()
        self.up = nn.Parameter(up.float(), requires_grad=trainable)
        self.down = nn.Parameter(down.float(), requires_grad=trainable)

    @classmethod
    def fresh(cls, weight: torch.Tensor, rank: int) -> "AdditiveChange":
        """A change to ``weight`` to tune: ``U`` zero (the weight as it was), ``V`` random with columns of
        about unit length."""
        fan_in = weight[0].numel()
        up = torch.zeros(weight.shape[0], rank, device=weight.device)
        down = torch.randn(fan_in, rank, device=weight.device) / math.sqrt(fan_in)
        return cls(up, down, trainable=True)

    def change(self, shape: torch.Size) -> torch.Tensor:
        """``U V^T`` shaped as the weight it is added to."""
        return (self.up @ self.down.T).reshape(shape)

    def identity(self) -> tuple[int, ...]:
        """Changes with the same identity hold the same values: where they are, and how often they were written."""
        return (self.up.data_ptr(), self.up._version, self.down.data_ptr(), self.down._version)


def stored_additive_changes(tensors: dict[str, torch.Tensor]) -> Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A concept file's changes by layer name, ``(up, down)``; None when it has none. ``KeyError`` (the
    layer's name) when a layer has one factor without the other."""
    ups = {
        k.removeprefix(PREFIX).removesuffix(".up"): v
        for k, v in tensors.items()
        if k.startswith(PREFIX) and k.endswith(".up")
    }
    downs = {
        k.removeprefix(PREFIX).removesuffix(".down"): v
        for k, v in tensors.items()
        if k.startswith(PREFIX) and k.endswith(".down")
    }
    if set(ups) != set(downs):
        raise KeyError(sorted(set(ups) ^ set(downs))[0])
    return {name: (ups[name], downs[name]) for name in ups} or None
