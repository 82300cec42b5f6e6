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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from e4tcli.errors import UsageError
from e4tcli.io.atomic import atomic_file
from e4tcli.io.checkpoint import EMA_NAME, load_checkpoint, save_checkpoint

OPTIMIZER_NAME = "optimizer.safetensors"
LATEST_NAME = "latest"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def _flatten(prefix: str, value, tensors: dict, scalars: dict) -> None:
    """Tensors under ``prefix`` into ``tensors``, everything else into ``scalars``; nested dicts
    (bitsandbytes keeps its 8-bit state in one) become ``prefix/key`` paths."""
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}/{key}", item, tensors, scalars)
    elif hasattr(value, "shape"):
        tensors[prefix] = value.detach().cpu().clone().contiguous()  # bitsandbytes shares its quantile maps
    else:
        scalars[prefix] = value


def _unflatten(paths: dict) -> dict:
    tree: dict = {}
    for path, value in paths.items():
        *folders, leaf = path.split("/")
        node = tree
        for folder in folders:
            node = node.setdefault(folder, {})
        node[leaf] = value
    return tree


def optimizer_to_safetensors(state: dict) -> tuple[dict, dict]:
    """An optimizer state dict as safetensors tensors plus JSON metadata.

    Parameters are keyed by position in ``keys``: integers for a plain
    ``optimizer.state_dict()``, parameter names for a gathered sharded one.
    """
    keys = list(state["state"])
    tensors, scalars = {}, {}
    for position, key in enumerate(keys):
        _flatten(f"state/{position}", state["state"][key], tensors, scalars)
    return tensors, {"keys": keys, "param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(tensors: dict, metadata: dict) -> dict:
    if "keys" not in metadata:  # the first layout: "state.<index>.<key>" tensors, "<index>.<key>" scalars
        tensors = {"state/" + name.removeprefix("state.").replace(".", "/", 1): t for name, t in tensors.items()}
        scalars = {"state/" + name.replace(".", "/", 1): v for name, v in metadata["scalars"].items()}
        tree = _unflatten({**tensors, **scalars}).get("state", {})
        return {"state": {int(i): values for i, values in tree.items()}, "param_groups": metadata["param_groups"]}
    tree = _unflatten({**tensors, **metadata["scalars"]}).get("state", {})
    keys = metadata["keys"]
    return {
        "state": {keys[int(position)]: values for position, values in tree.items()},
        "param_groups": metadata["param_groups"],
    }


def save_training_checkpoint(
    folder: Path,
    config: dict,
    model_tensors: dict,
    optimizer_state: dict,
    ema: Optional[dict] = None,
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


@dataclass
class TrainingState:
    """What a checkpoint holds to resume: full tensors, whatever wrapper saved them."""

    step: int
    tensors: dict
    optimizer: dict
    ema: Optional[dict]
    scaler: Optional[dict]


def read_training_state(folder: Path, expected: dict) -> TrainingState:
    """Read ``folder`` after checking it was written by a run like this one (domain, models, options)."""
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
        raise UsageError(
            f"{folder} has no optimizer state", hint="resume from a checkpoint written during pre-training"
        )
    with safe_open(str(optimizer_path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["e4t"])
    ema_path = checkpoint.folder / EMA_NAME
    return TrainingState(
        step=int(checkpoint.config["step"]),
        tensors=checkpoint.tensors,
        optimizer=optimizer_from_safetensors(load_file(str(optimizer_path)), metadata),
        ema=load_file(str(ema_path)) if ema_path.is_file() else None,
        scaler=metadata.get("scaler"),
    )
