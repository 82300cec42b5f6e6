"""Additive changes to the UNet's biases and normalization parameters, trained beside the weight offsets.

The weight offsets rescale weights (``W * (1 + dW)``): they cannot shift a layer's output, nor change a
normalization layer's scale and shift. On minifaces those carry what five to fifteen steps of weight
offsets leave out, hair colour and hair style first (docs/minifaces.md, "What the weight offsets cannot
change"). The base model's parameters stay untouched: a forward hook adds each change.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "biases."
"""Concept-file key prefix of the changes: ``biases.<module name>.<bias|weight>``."""

NORMS = (nn.GroupNorm, nn.LayerNorm)


def bias_targets(unet: nn.Module) -> dict[str, nn.Module]:
    """Each changed value's name, and the module whose output the hook corrects: every linear and
    convolution bias (a weight-offset wrapper stands for the layer it wraps) and every affine
    normalization layer's scale (``.weight``) and shift (``.bias``)."""
    targets: dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        if name.endswith("base_layer"):
            continue
        if isinstance(module, NORMS):
            if module.weight is not None and module.bias is not None:
                targets[f"{name}.weight"] = module
                targets[f"{name}.bias"] = module
            continue
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and layer.bias is not None:
            targets[f"{name}.bias"] = module
    return targets


def change_size(module: nn.Module) -> int:
    """Values in one of a target's changes: its bias's length (a normalization layer's scale has as many)."""
    layer = module if isinstance(module, NORMS) else getattr(module, "base_layer", module)
    return layer.bias.numel()


class BiasOffsets(nn.Module):
    """The changes (fp32 parameters, zero unless ``values`` are given) and the hooks that apply them."""

    def __init__(self, unet: nn.Module, values: Optional[dict[str, torch.Tensor]] = None):
        super().__init__()
        targets = bias_targets(unet)
        if values is not None and set(values) != set(targets):
            missing = sorted(set(values) ^ set(targets))[0]
            raise KeyError(missing)
        device = next(unet.parameters()).device
        self.changes = nn.ParameterList()
        for name, module in targets.items():
            size = change_size(module)
            start = torch.zeros(size) if values is None else values[name].float().reshape(size)
            self.changes.append(nn.Parameter(start.to(device)))
        self.names = list(targets)
        index = {name: i for i, name in enumerate(self.names)}
        self.handles = [
            module.register_forward_hook(self._hook_for(name.rsplit(".", 1)[0], module, index))
            for name, module in targets.items()
            if not name.endswith(".weight")
        ]

    @property
    def by_name(self) -> dict[str, nn.Parameter]:
        return dict(zip(self.names, self.changes))

    def _hook_for(self, module_name: str, module: nn.Module, index: dict[str, int]):
        """The hook reads its parameters from ``changes`` at each call: FSDP swaps them for its own."""
        shift_index = index[f"{module_name}.bias"]
        if isinstance(module, NORMS):
            scale_index = index[f"{module_name}.weight"]

            def renormalize(norm, inputs, _output):
                weight = norm.weight + self.changes[scale_index].to(norm.weight.dtype)
                bias = norm.bias + self.changes[shift_index].to(norm.bias.dtype)
                if isinstance(norm, nn.GroupNorm):
                    return F.group_norm(inputs[0], norm.num_groups, weight, bias, norm.eps)
                return F.layer_norm(inputs[0], norm.normalized_shape, weight, bias, norm.eps)

            return renormalize
        is_conv = isinstance(getattr(module, "base_layer", module), nn.Conv2d)

        def add_shift(_layer, _inputs, output):
            change = self.changes[shift_index].to(output.dtype)
            return output + (change[:, None, None] if is_conv else change)

        return add_shift

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def state(self) -> dict[str, torch.Tensor]:
        """The concept-file tensors."""
        return {f"{PREFIX}{name}": value.detach().float().cpu().contiguous() for name, value in self.by_name.items()}


def stored_changes(tensors: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
    """A concept file's bias changes by name, or None when it has none."""
    changes = {k.removeprefix(PREFIX): v for k, v in tensors.items() if k.startswith(PREFIX)}
    return changes or None
