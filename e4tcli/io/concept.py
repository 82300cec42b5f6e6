"""Concept files: ONE ``.safetensors`` per personalized concept.

Tensors: the tuned encoder with its reference folded in (``encoder.*``, see
``ConceptEncoder``: the part that reads the noisy latent, and one vector for
the reference, so generation needs neither the image nor the backbone), each
weight offset as its two thin factors (``offsets.<layer>.column`` and
``.row``; ``dW = column @ row.T``), the bias changes where tuned
(``biases.*``), and the additive weight changes where tuned (``additive.<layer>.up``
and ``.down``; format version 3: an older e4t refuses the file rather than draw
without them). Version 1 files held the whole encoder and the reference's
backbone features (``image_features``); they still load. The header's metadata
holds the recipe: domain, class word, token, base model and domain
checkpoint (source and fingerprint), encoder and offset configurations,
tuning settings. Only safetensors is read: nothing is ever unpickled.

``e4t tune --save-precision``: ``int8`` (the default) stores the encoder's
weight matrices (nine tenths of a concept at SD 1.5 shapes) and the additive changes' factors as 8-bit integers
with one fp16 scale per row (``<name>.int8_scale``) and every other tensor in
fp16; ``fp16`` and ``fp32`` store every tensor so. Reading the file gives
floats back; generation computes in fp32 (or the chosen precision) from the
rounded values. A tensor that fp16 cannot hold (a value over 65504) is kept in
fp32.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e4tcli.errors import UsageError
from e4tcli.io.atomic import atomic_file

FORMAT = "e4t-concept"
VERSION = 3
"""The newest format this e4t reads. A concept without additive weight changes is written as version 2,
which e4t releases without additive changes read in full."""
PRECISIONS = ("fp16", "fp32", "int8")
INT8_SCALE = ".int8_scale"
ADDITIVE_PREFIX = "additive."
"""Key prefix of the additive weight changes: ``additive.<layer>.up`` (out x rank), ``.down`` (fan-in x rank)."""
QUANTIZED = ("encoder.", ADDITIVE_PREFIX)
"""Key prefixes of the matrices ``--save-precision int8`` stores in 8 bits."""


@dataclass
class Concept:
    path: Path
    info: dict[str, Any]
    tensors: dict[str, Any]


def stored_tensors(tensors: dict[str, Any], precision: str = "fp16") -> dict[str, Any]:
    """``tensors`` as a concept file holds them: floating point ones in ``precision``, on the CPU."""
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"unknown concept precision '{precision}'", hint=f"use one of {', '.join(PRECISIONS)}")
    if precision == "int8":
        return quantized_matrices(stored_tensors(tensors, "fp16"))
    stored = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
            if precision == "fp16":
                half = tensor.half()
                if torch.isfinite(half).all() or not torch.isfinite(tensor).all():
                    tensor = half
        stored[name] = tensor.contiguous()
    return stored


def quantized_matrices(tensors: dict[str, Any]) -> dict[str, Any]:
    """The encoder's matrices and the additive weight changes' factors as int8 with a per-row scale (round
    to nearest, largest value of a row maps to 127): their values change by at most half a step, 1/254 of
    the row's largest."""
    import torch

    stored = {}
    for name, tensor in tensors.items():
        if name.startswith(QUANTIZED) and tensor.ndim == 2 and tensor.is_floating_point():
            weight = tensor.float()
            scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
            scale = scale.half().float()
            stored[name] = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
            stored[name + INT8_SCALE] = scale.half()
        else:
            stored[name] = tensor
    return stored


def dequantized(tensors: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``quantized_matrices``: every int8 matrix with its scale back as float32."""
    scaled = {name.removesuffix(INT8_SCALE) for name in tensors if name.endswith(INT8_SCALE)}
    return {
        name: tensor.float() * tensors[name + INT8_SCALE].float()[:, None] if name in scaled else tensor
        for name, tensor in tensors.items()
        if not name.endswith(INT8_SCALE)
    }


def save_concept(path: Path, tensors: dict[str, Any], info: dict[str, Any], precision: str = "fp16") -> int:
    """Write the concept atomically, floating point tensors in ``precision``; return its size in bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = stored_tensors(tensors, precision)
    info = info | {"precision": precision}
    version = VERSION if any(name.startswith(ADDITIVE_PREFIX) for name in tensors) else 2
    metadata = {"format": FORMAT, "version": str(version), "e4t": json.dumps(info, sort_keys=True)}
    for key in ("domain", "class_word", "token"):
        if key in info:
            metadata[key] = str(info[key])
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path.stat().st_size


def read_header(path: Path, missing: str, hint: str, read=None) -> tuple[dict[str, str], Any]:
    """A safetensors file's metadata, and ``read(handle)`` of its open header (no tensor is loaded);
    one line naming the problem for a missing or unreadable file (``missing``: "concept file", ...)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{missing} not found: {path}", hint=hint)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}, read(handle) if read else None
    except Exception as error:
        raise UsageError(f"{path} is not a safetensors file ({type(error).__name__})", hint=hint) from None


def read_concept_info(path: Path) -> dict[str, Any]:
    """The concept's recipe from the safetensors header, without loading tensors."""
    metadata, _ = read_header(path, "concept file", "pass the .safetensors file written by 'e4t tune'")
    if metadata.get("format") != FORMAT:
        raise UsageError(f"{path} is not an e4t concept", hint="pass a concept written by 'e4t tune'")
    if int(metadata.get("version", "0")) > VERSION:
        raise UsageError(f"{path} was written by a newer e4t", hint="upgrade e4t")
    return json.loads(metadata["e4t"])


def load_concept(path: Path) -> Concept:
    from safetensors.torch import load_file

    info = read_concept_info(path)
    return Concept(Path(path), info, dequantized(load_file(str(path))))
