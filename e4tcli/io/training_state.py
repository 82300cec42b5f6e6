"""Resumable training checkpoints: a domain checkpoint plus the optimizer state.

``checkpoint-NNNNNNN/`` holds ``config.json`` and ``model.safetensors`` (a
regular domain checkpoint that ``e4t tune`` accepts) and
``optimizer.safetensors`` (every optimizer state tensor; the non-tensor state
and hyper-parameters in its JSON metadata). The run folder's ``latest`` file
names the newest checkpoint. No pickle anywhere.
"""

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from e4tcli.errors import UsageError
from e4tcli.io.atomic import atomic_file
from e4tcli.io.checkpoint import EMA_NAME, load_checkpoint, save_checkpoint

OPTIMIZER_NAME = "optimizer.safetensors"
LATEST_NAME = "latest"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def optimizer_to_safetensors(state: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if hasattr(value, "shape"):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(tensors: dict, metadata: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for name, value in metadata["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": metadata["param_groups"]}



def save_training_checkpoint(
    folder: Path, config: dict, model_tensors: dict, optimizer_state: dict, ema: Optional[dict] = None,
    scaler_state: Optional[dict] = None,
) -> None:
    """``scaler_state``: the fp16 loss scaler's state (plain numbers), so a resumed fp16 run scales alike."""
    from safetensors.torch import save_file

    tensors, metadata = optimizer_to_safetensors(optimizer_state)
    metadata["scaler"] = scaler_state

    def write_optimizer(tmp: Path) -> None:
        save_file(tensors, str(tmp / OPTIMIZER_NAME), metadata={"e4t": json.dumps(metadata)})
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / EMA_NAME))

    save_checkpoint(folder, config, model_tensors, extra=write_optimizer)
    with atomic_file(folder.parent / LATEST_NAME) as tmp:
        tmp.write_text(folder.name + "\n")


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the ``keep_last`` most recently written checkpoints (by write time, not step:
    after resuming from an older checkpoint, the new ones must survive)."""
    found = sorted(
        (p.stat().st_mtime_ns, p) for p in run_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name) and p.is_dir()
    )
    for _, path in found[: max(0, len(found) - max(keep_last, 1))]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """``latest`` -> the run folder's newest checkpoint; otherwise a checkpoint folder path."""
    if resume != "latest":
        return Path(resume)
    pointer = run_dir / LATEST_NAME
    if not pointer.is_file():
        raise UsageError(f"nothing to resume in {run_dir} (no '{LATEST_NAME}' file)", hint="start without --resume")
    return run_dir / pointer.read_text().strip()


def load_training_state(folder: Path, model, optimizer, expected: dict, scaler=None) -> tuple[int, Optional[dict]]:
    """Restore model, optimizer (and fp16 loss scaler) from ``folder``; return its step and EMA weights (if any)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    checkpoint = load_checkpoint(folder, prefer_ema=False)
    for key in ("domain", "base_model", "backbone", "encoder", "offsets"):
        if json.dumps(checkpoint.config.get(key), sort_keys=True) != json.dumps(expected.get(key), sort_keys=True):
            raise UsageError(
                f"cannot resume from {folder}: its {key.replace('_', ' ')} differs from this run's",
                hint="resume with the same domain, models and options, or start a new --out folder",
            )
    optimizer_path = Path(folder) / OPTIMIZER_NAME
    if not optimizer_path.is_file():
        raise UsageError(f"{folder} has no optimizer state", hint="resume from a checkpoint written during pre-training")
    model.load_trainable_state_dict(checkpoint.tensors)
    with safe_open(str(optimizer_path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["e4t"])
    optimizer.load_state_dict(optimizer_from_safetensors(load_file(str(optimizer_path)), metadata))
    if scaler is not None and metadata.get("scaler"):
        scaler.load_state_dict(metadata["scaler"])
    ema_path = checkpoint.folder / EMA_NAME
    ema = load_file(str(ema_path)) if ema_path.is_file() else None
    return int(checkpoint.config["step"]), ema


