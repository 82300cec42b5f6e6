"""Feeding pre-training: decoding in worker processes, and an optional feature cache.

``MicroBatches`` turns the deterministic plan of each step into decoded
images in DataLoader workers (pinned memory on CUDA), so the GPU does not
wait on JPEG/PNG decoding. ``FeatureCache`` pre-computes each image's VAE
posterior and backbone features once (both orientations) into safetensors
chunks in the run folder; training then never decodes an image again.
"""

import json
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from e4tcli.errors import E4TError
from e4tcli.training.images import latent_distribution, square_resize

CHUNK = 256
ENCODE_BATCH = 16
"""Images encoded at once while building the cache (as many as a batch-16 step encodes): a whole chunk
(512 views at 512 px) through the VAE would need well over 100 GB of GPU memory."""


def read(dataset, index: int, with_metadata: bool = False) -> tuple:
    """``(image, metadata or None)``, the metadata of the record actually read.

    A dataset replaces an unreadable record by the next readable one, so the
    prompt must be filled from that one's metadata, not the planned index's.
    """
    if not with_metadata:
        return dataset[index], None
    if hasattr(dataset, "sample"):
        return dataset.sample(index)
    return dataset[index], (dataset.metadata(index) if hasattr(dataset, "metadata") else None)


def decode(
    dataset, index: int, resolution: int, preprocess: Optional[Callable] = None, with_metadata: bool = False
) -> tuple[np.ndarray, Optional[dict]]:
    """One dataset image as an (H, W, 3) uint8 array at ``resolution``, and its metadata (see ``read``)."""
    image, metadata = read(dataset, index, with_metadata)
    image = square_resize(preprocess(image) if preprocess else image, resolution)
    return np.asarray(image.convert("RGB"), dtype=np.uint8), metadata


class MicroBatches(torch.utils.data.Dataset):
    """Item k is this process's k-th micro-batch from ``first_step`` on: (H, W, 3) uint8 images, flipped as planned."""

    def __init__(
        self,
        dataset,
        plan: Callable[[int], list],
        first_step: int,
        last_step: int,
        accumulation: int,
        world: int,
        rank: int,
        per_device: int,
        resolution: int,
        preprocess: Optional[Callable] = None,
        with_metadata: bool = False,
    ):
        self.dataset, self.plan, self.first_step = dataset, plan, first_step
        self.count = max(0, last_step - first_step + 1) * accumulation
        self.accumulation, self.world, self.rank, self.per_device = accumulation, world, rank, per_device
        self.resolution, self.preprocess, self.with_metadata = resolution, preprocess, with_metadata

    def __len__(self) -> int:
        return self.count

    def samples(self, item: int) -> list:
        step, micro = self.first_step + item // self.accumulation, item % self.accumulation
        first = (micro * self.world + self.rank) * self.per_device
        return self.plan(step)[first : first + self.per_device]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, list, list]:
        """The micro-batch, the files found unreadable while decoding it, and each image's metadata.

        In a worker process the dataset is a copy, so what it learns about bad
        files must travel back with the batch to be counted.
        """
        skipped = getattr(self.dataset, "skipped", None)
        known = len(skipped) if skipped is not None else 0
        arrays, metadata = [], []
        for sample in self.samples(item):
            try:
                array, record = decode(self.dataset, sample.index, self.resolution, self.preprocess, self.with_metadata)
            except E4TError as error:
                if torch.utils.data.get_worker_info() is None:
                    raise
                return error  # raised by next_micro_batch; the DataLoader would bury it in a worker traceback
            arrays.append(array[:, ::-1] if sample.flip else array)
            metadata.append(record)
        found = list(skipped[known:]) if skipped is not None else []
        return torch.from_numpy(np.ascontiguousarray(np.stack(arrays))), found, metadata


def next_micro_batch(micro_batches) -> tuple:
    """The next item of a ``loader``; an E4TError met while decoding it (e.g. a shard server gone) is raised here."""
    item = next(micro_batches)
    if isinstance(item, E4TError):
        raise item
    return item


def merge_skipped(dataset, found: list) -> None:
    """Record files a worker found unreadable in the training process's dataset (once each)."""
    skipped = getattr(dataset, "skipped", None)
    if skipped is None:
        return
    for entry in found:
        if entry not in skipped:
            skipped.append(entry)


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers share the terminal's process group: Ctrl-C must stop the trainer (which saves), not them."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader(micro_batches: MicroBatches, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        micro_batches,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
        worker_init_fn=_ignore_stop_signals if workers else None,
    )


def stop_workers(iterator) -> None:
    """Stop a ``loader`` iterator's worker processes now, also after an error.

    The workers ignore SIGTERM (``_ignore_stop_signals``), so one left to the
    interpreter's exit, which only terminates them, keeps the process from ending.
    """
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def uint8_to_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class FeatureCache:
    """VAE posterior (mean, std) and backbone [CLS] features of every image, both orientations."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def matches(self, key: dict) -> bool:
        info = self.folder / "cache.json"
        return info.is_file() and json.loads(info.read_text()) == key

    def build(
        self,
        key: dict,
        dataset,
        count: int,
        encode: Callable[[list], tuple],
        resolution: int,
        preprocess: Optional[Callable] = None,
        rank: int = 0,
        world: int = 1,
        with_metadata: bool = False,
    ) -> None:
        """``encode(list of uint8 arrays) -> (mean, std, features)``, called on at most ``ENCODE_BATCH``
        images at a time; chunk k is written by rank k % world.

        With ``with_metadata`` each chunk also keeps the metadata of the records
        actually read (see ``read``), for the prompts.

        Chunks are written atomically and tagged with ``key``, so an interrupted
        build resumes where it stopped; ``finish`` (rank 0) marks the cache complete.
        """
        from safetensors import safe_open
        from safetensors.torch import save_file

        from e4tcli.io.atomic import atomic_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tag = json.dumps(key, sort_keys=True)
        for number in range(rank, math.ceil(count / CHUNK), world):
            path = self.folder / f"chunk-{number:05d}.safetensors"
            if path.is_file():
                with safe_open(str(path), framework="pt") as handle:
                    if (handle.metadata() or {}).get("key") == tag:
                        continue
            first = number * CHUNK
            decoded = [
                decode(dataset, i, resolution, preprocess, with_metadata)
                for i in range(first, min(first + CHUNK, count))
            ]
            both = [a for array, _ in decoded for a in (array, np.ascontiguousarray(array[:, ::-1]))]
            parts = [encode(both[i : i + ENCODE_BATCH]) for i in range(0, len(both), ENCODE_BATCH)]
            tensors = {
                name: torch.cat([part[k].cpu() for part in parts]) for k, name in enumerate(("mean", "std", "features"))
            }
            records = json.dumps([record for _, record in decoded])
            with atomic_file(path) as tmp:
                save_file(
                    {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"key": tag, "records": records}
                )

    def finish(self, key: dict) -> None:
        from e4tcli.io.atomic import atomic_file

        with atomic_file(self.folder / "cache.json") as tmp:
            tmp.write_text(json.dumps(key))

    def lookup(self, index: int, flip: bool) -> tuple:
        """One image's (mean, std, features, metadata), read alone (the chunk files are memory-mapped, not loaded whole)."""
        from safetensors import safe_open

        number, offset = divmod(index, CHUNK)
        row = 2 * offset + int(flip)
        with safe_open(str(self.folder / f"chunk-{number:05d}.safetensors"), framework="pt") as handle:
            tensors = tuple(handle.get_slice(name)[row : row + 1][0] for name in ("mean", "std", "features"))
            records = json.loads((handle.metadata() or {}).get("records", "null")) or [None] * CHUNK
        return (*tensors, records[offset])


def encode_arrays(model, backbone, arrays: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VAE posterior and backbone features of uint8 images, in fp32."""
    from e4tcli.models.loading import backbone_features

    pixels = uint8_to_pixels(torch.from_numpy(np.stack(arrays)))
    mean, std = latent_distribution(model.vae, pixels, model.family.vae_upcast)
    features = backbone_features(backbone, list(arrays), model.encoder_config.backbone_layers)
    return mean, std, features
