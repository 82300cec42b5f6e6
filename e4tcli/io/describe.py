"""What an e4t file holds, read from its safetensors header alone (no tensor is loaded)."""

import json
import time
from pathlib import Path
from typing import Any

from e4tcli.errors import UsageError

_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def tensor_table(handle) -> list[dict[str, Any]]:
    rows = []
    for name in handle.keys():
        piece = handle.get_slice(name)
        shape, dtype = list(piece.get_shape()), piece.get_dtype()
        count = 1
        for size in shape:
            count *= size
        rows.append({"name": name, "shape": shape, "dtype": dtype, "bytes": count * _ITEM_BYTES.get(dtype, 4)})
    return rows


def tensor_groups(tensors: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Tensors summed by the first part of their name (``encoder``, ``offsets``, ``lora_unet_...``: ``lora_unet``)."""
    groups: dict[str, dict[str, int]] = {}
    for row in tensors:
        group = row["name"].split(".")[0]
        if group.startswith("lora_unet_"):
            group = "lora_unet"
        entry = groups.setdefault(group, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += row["bytes"]
    return groups


def describe_file(path: Path) -> dict[str, Any]:
    """A concept's or an exported file's recipe, tensors and sizes; a one-line error for any other file."""
    from e4tcli.export import FORMAT as EXPORT_FORMAT
    from e4tcli.io.concept import ADDITIVE_PREFIX, read_header
    from e4tcli.io.concept import FORMAT as CONCEPT_FORMAT

    path = Path(path)
    metadata, tensors = read_header(path, "file", "pass a concept or a file written by 'e4t export'", tensor_table)
    kind = metadata.get("format")
    if kind not in (CONCEPT_FORMAT, EXPORT_FORMAT) or "e4t" not in metadata:
        raise UsageError(
            f"{path} is not an e4t concept or exported file", hint="pass a file written by 'e4t tune' or 'e4t export'"
        )
    info = json.loads(metadata["e4t"])
    described: dict[str, Any] = {"file": str(path), "size_bytes": path.stat().st_size}
    if kind == CONCEPT_FORMAT:
        offsets = {
            row["name"].removeprefix("offsets.").rsplit(".", 1)[0]
            for row in tensors
            if row["name"].startswith("offsets.")
        }
        described |= {
            "kind": "concept",
            "domain": info.get("domain"),
            "class_word": info.get("class_word"),
            "base_model": info.get("base_model"),
            "checkpoint": info.get("checkpoint", "-"),
            "steps": info.get("tuning", {}).get("steps"),
            "offsets": info.get("offsets", {}) | {"count": len(offsets)},
            "additive_rank": next(
                (
                    row["shape"][1]
                    for row in tensors
                    if row["name"].startswith(ADDITIVE_PREFIX) and row["name"].endswith(".up")
                ),
                0,
            ),
            "precision": info.get("precision"),
            "created": info.get("created") or _modified(path),
            "e4t_version": info.get("e4t_version"),
        }
    else:
        concept = info.get("concept", {})
        described |= {
            "kind": f"exported {info.get('kind')}",
            "export_format": info.get("format"),
            "token": info.get("token"),
            "rank": info.get("rank"),
            "energy_kept": info.get("energy_kept"),
            "domain": concept.get("domain"),
            "base_model": concept.get("base_model"),
            "checkpoint": concept.get("checkpoint", "-"),
            "created": info.get("created") or _modified(path),
            "e4t_version": info.get("e4t_version"),
        }
    described["tensor_groups"] = tensor_groups(tensors)
    described["tensors"] = tensors
    return described


def _modified(path: Path) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime)) + " (file modified)"
