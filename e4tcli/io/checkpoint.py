"""Domain checkpoints: a folder with ``config.json`` and ``model.safetensors``.

``config.json`` records the domain, the base model and backbone (source and
content fingerprint), the encoder and offset configurations, every
hyper-parameter and the step. ``model.safetensors`` holds the encoder and the
weight offsets in their trainable parameterisation, so tuning continues from
exactly where pre-training stopped. A checkpoint folder is always complete or
absent (written under a temporary name, then renamed). A pre-training run
folder (``checkpoint-NNNNNNN/`` folders and a ``latest`` file) may be given
wherever a checkpoint is expected: its latest checkpoint is used.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from e4tcli.errors import UsageError
from e4tcli.io.atomic import atomic_folder
from e4tcli.io.fingerprint import fingerprint_tensors

FORMAT = "e4t-domain-checkpoint"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"


@dataclass
class DomainCheckpoint:
    config: dict[str, Any]
    tensors: dict[str, Any]
    fingerprint: str
    folder: Path


def save_checkpoint(
    folder: Path, config: dict[str, Any], tensors: dict[str, Any], extra: Optional[Callable[[Path], None]] = None
) -> str:
    """Write ``folder`` atomically; return the checkpoint's fingerprint.

    ``extra(tmp_folder)`` may add files (e.g. optimizer state) before the rename.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    fingerprint = fingerprint_tensors(tensors)
    full = {"format": FORMAT, "version": VERSION, **config, "fingerprint": fingerprint}
    with atomic_folder(Path(folder)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        if extra is not None:
            extra(tmp)
    return fingerprint


def load_checkpoint(folder: Path, prefer_ema: bool = True) -> DomainCheckpoint:
    """Load a checkpoint; its EMA weights (``ema.safetensors``) when present and ``prefer_ema``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    latest = folder / "latest"
    if not (folder / CONFIG_NAME).exists() and latest.is_file():  # a pre-training run folder
        folder = folder / latest.read_text().strip()
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise UsageError(
            f"no domain checkpoint at {folder} (expected {CONFIG_NAME} and {WEIGHTS_NAME})",
            hint="pass --checkpoint a folder written by 'e4t pretrain'",
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{config_path} is not valid JSON ({error})", hint="re-create the checkpoint") from None
    if config.get("format") != FORMAT:
        raise UsageError(f"{folder} is not an e4t domain checkpoint", hint="pass a folder written by 'e4t pretrain'")
    if config.get("version", 0) > VERSION:
        raise UsageError(f"{folder} was written by a newer e4t (format {config['version']})", hint="upgrade e4t")
    ema_path = folder / EMA_NAME
    tensors = load_file(str(ema_path if prefer_ema and ema_path.is_file() else weights_path))
    fingerprint = fingerprint_tensors(tensors)
    return DomainCheckpoint(config, tensors, fingerprint, folder)
