"""The attribute reader: the benchmark's judge of identity and scene.

A small CNN (``models.AttributeReader``) trained on generator output only,
with noise, blur and colour jitter so that it reads imperfect generated
images too. It reads all seven identity attributes and the two scene
attributes; its own accuracy on clean generator images (all identities,
held-out ones included; hair colour only where there is hair) is stored in
the weights file's header.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from e4t_minifaces import world
from e4t_minifaces.models import AttributeReader

IGNORE = -100
"""Label of an attribute the picture does not show (cross_entropy's ignore_index)."""


def labelled_batch(rng: random.Random, count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Uniformly drawn identities (both splits) in random scenes."""
    images, labels = [], {name: [] for name in world.LABEL_NAMES}
    for _ in range(count):
        identity = world.Identity.from_index(rng.randrange(world.NUM_IDENTITIES))
        scene = world.random_scene(rng)
        images.append(world.render(identity, scene, jitter=rng.randrange(1, 2**31)))
        visible = set(identity.visible()) | set(world.SCENE_CHOICES)
        for name, value in world.all_labels(identity, scene).items():
            labels[name].append(value if name in visible else IGNORE)
    return torch.from_numpy(world.image_array(images)), {k: torch.tensor(v) for k, v in labels.items()}


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise, a random blur for half the batch, and a small per-channel colour shift."""
    count = pixels.shape[0]
    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(count, 1, 1, 1, generator=generator) < 0.5).float()
    pixels = pick * blurred + (1 - pick) * pixels
    pixels = pixels + 0.08 * torch.randn(count, 3, 1, 1, generator=generator)
    sigma = 0.15 * torch.rand(count, 1, 1, 1, generator=generator)
    return (pixels + sigma * torch.randn(pixels.shape, generator=generator)).clamp(-1, 1)


def train_reader(
    steps: int, seed: int = 0, batch_size: int = 64, log: Optional[Callable[[str], None]] = None
) -> tuple[AttributeReader, dict[str, float]]:
    torch.manual_seed(seed)
    reader = AttributeReader()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    reader.train()
    for step in range(steps):
        pixels, labels = labelled_batch(rng, batch_size)
        logits = reader(augment(pixels, generator))
        loss = sum(F.cross_entropy(logits[name], labels[name]) for name in world.LABEL_NAMES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"step {step} loss {loss.item():.3f}")
    accuracy = clean_accuracy(reader, seed + 1)
    if log:
        log("accuracy on clean generator images: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    return reader, accuracy


@torch.no_grad()
def clean_accuracy(reader: AttributeReader, seed: int, count: int = 2000) -> dict[str, float]:
    """Per-attribute accuracy on fresh, clean generator images (a seed never used in training)."""
    pixels, labels = labelled_batch(random.Random(f"clean:{seed}"), count)
    predicted = predict(reader, pixels)
    accuracy = {}
    for name in world.LABEL_NAMES:
        truth = labels[name].numpy()
        shown = truth != IGNORE
        accuracy[name] = float((predicted[name][shown] == truth[shown]).mean())
    return accuracy


@torch.no_grad()
def predict(reader: AttributeReader, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    reader.eval()
    logits = reader(pixels)
    return {name: value.argmax(1).numpy() for name, value in logits.items()}


def read_images(reader: AttributeReader, images: list) -> dict[str, np.ndarray]:
    """The attributes each PIL image shows, as choice indices (``world.ALL_CHOICES`` order)."""
    images = [image.convert("RGB").resize((world.RESOLUTION, world.RESOLUTION)) for image in images]
    return predict(reader, torch.from_numpy(world.image_array(images)))


def save_reader(reader: AttributeReader, path: Path, accuracy: dict[str, float]) -> None:
    from safetensors.torch import save_file

    from e4tcli.io.atomic import atomic_file

    tensors = {k: v.detach().half().contiguous() for k, v in reader.state_dict().items() if v.is_floating_point()}
    with atomic_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={"accuracy": json.dumps(accuracy)})


def load_reader(path: Path) -> tuple[AttributeReader, dict[str, float]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    reader = AttributeReader()
    tensors = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = reader.load_state_dict(tensors, strict=False)
    if unexpected or any(not name.endswith("num_batches_tracked") for name in missing):
        raise ValueError(f"{path} does not match the attribute reader (missing {missing}, unexpected {unexpected})")
    with safe_open(str(path), "pt") as handle:
        accuracy = json.loads(handle.metadata()["accuracy"])
    return reader.eval(), accuracy
