"""A concept's weight offsets as a LoRA: each layer's change ``W * dW`` factored by truncated SVD.

E4T changes a layer's weight element-wise, ``W' = W * (1 + dW)`` with ``dW`` of
low rank; the change ``W * dW`` itself is not of low rank, so it is factored:
``W * dW ~ up @ down`` with the ``rank`` largest singular values, split evenly
(``up = U sqrt(S)``, ``down = sqrt(S) V^T``). A convolution's change is
factored as an (out, in x kh x kw) matrix: ``down`` becomes a convolution of
the layer's own kernel size and ``up`` a 1x1 convolution, as LoCon files store
them. The share of the change's energy (squared Frobenius norm) that the kept
singular values hold says how much of the offsets survives. A concept's additive weight changes
(``U V^T``, ``e4tcli.models.additive_changes``) are part of the change: ``W * dW + U V^T``.
"""

from dataclasses import dataclass
from typing import Optional

import torch

FULL_RANK = 0
"""``rank`` meaning: keep every singular value (exact up to rounding)."""


@dataclass
class LoraLayer:
    down: torch.Tensor
    """(rank, in) for a linear layer, (rank, in, kh, kw) for a convolution."""
    up: torch.Tensor
    """(out, rank), or (out, rank, 1, 1)."""
    energy_kept: float
    energy: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def weight_change(weight: torch.Tensor, column: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """``W * dW`` with ``dW = column @ row^T`` (out x in), applied to every tap of a convolution's kernel."""
    delta = column.double() @ row.double().T
    delta = delta.reshape(delta.shape + (1,) * (weight.dim() - 2))
    return weight.double() * delta


def factor(change: torch.Tensor, rank: int = FULL_RANK) -> LoraLayer:
    """The best rank-``rank`` factors of ``change`` (``FULL_RANK``: all of them)."""
    out_channels = change.shape[0]
    matrix = change.reshape(out_channels, -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = s.numel() if rank == FULL_RANK else min(rank, s.numel())
    root = s[:keep].sqrt()
    up = u[:, :keep] * root
    down = root[:, None] * vh[:keep]
    energy = float((s**2).sum())
    if change.dim() == 4:
        down = down.reshape(keep, *change.shape[1:])
        up = up.reshape(out_channels, keep, 1, 1)
    return LoraLayer(down.float(), up.float(), float((s[:keep] ** 2).sum()), energy)


def factor_offsets(model, rank: int = FULL_RANK, layers: Optional[list[str]] = None) -> dict[str, LoraLayer]:
    """Every offset layer of an ``E4TModel`` (name as in the UNet, e.g. ``down_blocks.0....attn1.to_q``) as LoRA factors."""
    factored = {}
    with torch.no_grad():
        for name, layer in model.offsets.items():
            if layers is not None and name not in layers:
                continue
            column, row = layer.factors()
            weight = layer.base_layer.weight.detach().cpu()  # SVD in float64 on the CPU, whatever the device
            change = weight_change(weight, column.detach().cpu(), row.detach().cpu())
            if layer.additive is not None:
                change = change + layer.additive.change(weight.shape).detach().cpu().double()
            factored[name] = factor(change, rank)
    widest = max(lora.rank for lora in factored.values())
    return {name: padded(lora, widest) for name, lora in factored.items()}


def padded(lora: LoraLayer, rank: int) -> LoraLayer:
    """``lora`` with zero factors added up to ``rank``: the same change, at one rank for every layer.

    Layers narrower than the rank (or, at full rank, of different widths) would otherwise differ in
    rank, and diffusers' kohya reader then applies some at the wrong scale (their alphas are dropped)."""
    extra = rank - lora.rank
    if extra <= 0:
        return lora
    down = torch.cat([lora.down, lora.down.new_zeros((extra, *lora.down.shape[1:]))])
    up = torch.cat([lora.up, lora.up.new_zeros((lora.up.shape[0], extra, *lora.up.shape[2:]))], dim=1)
    return LoraLayer(down, up, lora.energy_kept, lora.energy)


def energy_kept(factored: dict[str, LoraLayer]) -> float:
    """The share of all layers' change kept: sum of kept over sum of total squared singular values."""
    total = sum(layer.energy for layer in factored.values())
    return 1.0 if total == 0 else sum(layer.energy_kept for layer in factored.values()) / total


def kohya_name(layer: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``lora_unet_down_blocks_0_..._attn1_to_q``."""
    return "lora_unet_" + layer.replace(".", "_")


def kohya_tensors(factored: dict[str, LoraLayer]) -> dict[str, torch.Tensor]:
    """Keys as kohya's sd-scripts write them; ``alpha`` equal to the rank, so the LoRA applies at scale 1."""
    tensors = {}
    for layer, lora in factored.items():
        name = kohya_name(layer)
        tensors[f"{name}.lora_down.weight"] = lora.down
        tensors[f"{name}.lora_up.weight"] = lora.up
        tensors[f"{name}.alpha"] = torch.tensor(float(lora.rank))
    return tensors


def peft_tensors(factored: dict[str, LoraLayer]) -> dict[str, torch.Tensor]:
    """Keys as diffusers' ``save_lora_weights`` writes them (peft's ``lora_A``/``lora_B``, ``unet.`` prefix);
    without alphas, diffusers applies each at scale 1."""
    tensors = {}
    for layer, lora in factored.items():
        tensors[f"unet.{layer}.lora_A.weight"] = lora.down
        tensors[f"unet.{layer}.lora_B.weight"] = lora.up
    return tensors
