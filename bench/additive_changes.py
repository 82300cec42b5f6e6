"""A lever of ``bench/minifaces_quality.py``: E4T's tuning also trains an additive low-rank change to each
weight the offsets modulate, ``W * (1 + dW) + U V^T``, from zero (``U`` zero, ``V`` random), at a rate of its
own, beside the encoder, the offsets and the bias changes.

The offsets only rescale weights (a convolution's whole kernel at once): they cannot give a weight a
direction it lacks, which whole-UNet DreamBooth can, and it carries the eye spacing E4T leaves out. Concept files
have no place for these changes yet: the evaluation keeps each concept's changes in memory, from its tuning
to the model it draws with. Measured in docs/minifaces.md ("Additive weight changes").
"""

import math
from dataclasses import dataclass, field

LAYERS = ("all", "attention", "convolutions")


@dataclass
class AdditiveChanges:
    rank: int
    learning_rate: float
    layers: str = "all"
    tuned: dict = field(default_factory=dict)
    """Layer name -> ``(U, V)`` of the concept tuned last."""
    changing: dict = field(default_factory=dict)
    """Layer name -> the offset layer that holds changes being tuned."""
    values: int = 0
    """Values one concept's changes hold (``U`` and ``V`` of every changed layer)."""
    drawn: int = 0
    """Weights formed with a concept's changes while drawing (a check that the lever reaches generation)."""

    def wanted(self, layer) -> bool:
        from torch import nn

        is_convolution = isinstance(layer.base_layer, nn.Conv2d)
        return self.layers == "all" or is_convolution == (self.layers == "convolutions")

    def start(self, model) -> list:
        """Fresh changes on ``model``'s offset layers: their parameters, for the optimizer."""
        import torch

        self.changing = {name: layer for name, layer in model.offsets.items() if self.wanted(layer)}
        parameters = []
        for layer in self.changing.values():
            weight = layer.base_layer.weight
            fan_in = weight[0].numel()
            up = torch.nn.Parameter(torch.zeros(weight.shape[0], self.rank, device=weight.device))
            down = torch.nn.Parameter(torch.randn(fan_in, self.rank, device=weight.device) / math.sqrt(fan_in))
            layer.additive = (up, down)
            parameters += [up, down]
        self.values = sum(p.numel() for p in parameters)
        return parameters

    def take_tuned(self) -> None:
        """Move the changes the last tuning trained off the (shared) model into ``tuned``."""
        self.tuned = {name: tuple(p.detach().clone() for p in layer.additive) for name, layer in self.changing.items()}
        for layer in self.changing.values():
            layer.additive = None
        self.changing = {}

    def install(self) -> None:
        """Patch tuning, concept drawing and the offset layers (in this process) to carry the changes."""
        import e4t_minifaces.evaluate as evaluate

        import e4tcli.training.tune as tune
        from e4tcli.models.weight_offsets import FixedOffset, OffsetLinear

        modulated_weight, optimizer_for = OffsetLinear.modulated_weight, tune.optimizer_for
        tuned_concept, concept_model = evaluate.tuned_concept, evaluate.World.concept_model
        lever = self

        def with_changes(layer, dtype):
            weight = modulated_weight(layer, dtype)
            additive = getattr(layer, "additive", None)
            if additive is None:
                return weight
            if isinstance(layer.offset, FixedOffset):
                lever.drawn += 1
            up, down = additive
            return weight + (up @ down.T).reshape(layer.base_layer.weight.shape).to(dtype)

        def optimizer_with_changes(model, *args, **kwargs):
            optimizer = optimizer_for(model, *args, **kwargs)
            optimizer.add_param_group({"params": lever.start(model), "lr": lever.learning_rate, "weight_decay": 0.0})
            return optimizer

        def concept_with_changes(*args, **kwargs):
            concept = tuned_concept(*args, **kwargs)
            lever.take_tuned()  # none when the concept was not tuned (E4T-0)
            return concept

        def drawn_with_changes(w, tensors, like=None):
            model = concept_model(w, tensors, like)
            for name, changes in lever.tuned.items():
                model.offsets[name].additive = changes
            return model

        OffsetLinear.modulated_weight = with_changes
        tune.optimizer_for = optimizer_with_changes
        evaluate.tuned_concept = concept_with_changes
        evaluate.World.concept_model = drawn_with_changes

    def summary(self) -> dict:
        """The lever's settings and counts, for the bench's JSON (``tuned_layers``: of the concept tuned last)."""
        settings = {"rank": self.rank, "learning_rate": self.learning_rate, "layers": self.layers}
        return settings | {"values": self.values, "drawn": self.drawn, "tuned_layers": len(self.tuned)}
