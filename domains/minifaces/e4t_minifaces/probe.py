"""Can the encoder see an identity? A linear probe on the backbone features it reads.

The encoder's image input is the [CLS] token of every 2nd layer of the
backbone. Whatever a linear map cannot read from those features for faces the
backbone never saw, the encoder's first layer (a linear map per layer) cannot
easily use either. The probe is a multinomial logistic regression per identity
attribute, fitted on portraits of training identities and scored on portraits
of held-out identities (centred, on gray, as a user's reference photo is).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from e4t_minifaces import world


@dataclass
class ProbeScore:
    attribute: str
    accuracy: float
    """On held-out identities' portraits."""
    chance: float


def portrait_features(backbone, layers: tuple[int, ...], identities: list[world.Identity]) -> torch.Tensor:
    from e4tcli.models.loading import backbone_features

    chunks = []
    for start in range(0, len(identities), 256):
        images = [world.portrait(identity) for identity in identities[start : start + 256]]
        chunks.append(backbone_features(backbone, images, layers).flatten(1))
    return torch.cat(chunks)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    torch.manual_seed(0)
    probe = torch.nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(features), labels) + 1e-4 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def probe_backbone(
    backbone, layers: tuple[int, ...], train_count: int = 2000, test_count: int = 500, seed: int = 0
) -> list[ProbeScore]:
    rng = random.Random(f"probe:{seed}")
    train = [world.random_identity(rng) for _ in range(train_count)]
    test = [world.random_identity(rng, held_out=True) for _ in range(test_count)]
    train_x, test_x = portrait_features(backbone, layers, train), portrait_features(backbone, layers, test)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    scores = []
    for name, choices in world.IDENTITY_CHOICES.items():

        def labels_of(identities):
            return torch.tensor([choices.index(getattr(i, name)) for i in identities])

        def shown(identities):
            return torch.tensor([name in i.visible() for i in identities])

        keep_train, keep_test = shown(train), shown(test)
        probe = fit_probe(train_x[keep_train], labels_of(train)[keep_train], len(choices))
        with torch.no_grad():
            predicted = probe(test_x[keep_test]).argmax(1)
        accuracy = float((predicted == labels_of(test)[keep_test]).float().mean())
        scores.append(ProbeScore(name, accuracy, 1 / len(choices)))
    return scores


def main() -> None:
    import argparse
    from pathlib import Path

    from e4t_minifaces import WEIGHTS
    from e4tcli.models.loading import load_backbone

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", type=Path, default=WEIGHTS / "backbone")
    args = parser.parse_args()
    backbone = load_backbone(str(args.backbone))
    layers = tuple(range(2, backbone.model.config.num_hidden_layers + 1, 2))
    for score in probe_backbone(backbone, layers):
        print(f"{score.attribute:12s} {score.accuracy:.3f} (chance {score.chance:.3f})")


if __name__ == "__main__":
    main()
