"""Content fingerprints of models, to tell "the same base model" from another one.

Hashing every byte of a 4 GB model would take seconds on each run; instead we
hash every tensor's name, shape, and an evenly spaced sample of up to 4,096 of
its values. Two different fine-tunes differ in practically every tensor, so
they differ here too. Values are rounded to fp16 first, so a model loaded in
fp32 on a CPU and in fp16 on a GPU has the same fingerprint.
"""

import hashlib
from typing import Mapping

SAMPLES_PER_TENSOR = 4096


def fingerprint_tensors(tensors: Mapping[str, "object"]) -> str:
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        flat = tensor.reshape(-1)
        if flat.numel() > SAMPLES_PER_TENSOR:
            index = (
                torch.arange(SAMPLES_PER_TENSOR, device=flat.device) * (flat.numel() - 1) // (SAMPLES_PER_TENSOR - 1)
            )
            flat = flat[index]
        values = flat.to(device="cpu", dtype=torch.float16).numpy().tobytes()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(values)
    return digest.hexdigest()[:16]


def fingerprint_modules(**modules) -> str:
    tensors = {}
    for prefix, module in modules.items():
        for name, tensor in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = tensor
    return fingerprint_tensors(tensors)
