"""Where and in which precision to run: CUDA, then MPS, then CPU."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

from e4tcli.errors import UsageError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Placement:
    device: "torch.device"
    dtype: "torch.dtype"
    """dtype of the frozen weights; trainable weights always stay fp32."""

    @property
    def autocast(self):
        """A context that runs matmuls in ``dtype`` on GPUs; a no-op in fp32."""
        import contextlib

        import torch

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def choose_placement(device: Optional[str] = None, precision: str = "auto") -> Placement:
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'", hint=f"use one of {', '.join(PRECISIONS)}")
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    try:
        target = torch.device(device)
        torch.empty(0, device=target)
    except (RuntimeError, AssertionError) as error:
        raise UsageError(
            f"device '{device}' is not usable here ({error})", hint="pass --device cpu, or omit --device"
        ) from None
    if precision == "auto":
        precision = "fp16" if target.type == "cuda" else "fp32"
    if target.type == "cpu" and precision != "fp32":
        raise UsageError(f"{precision} is not supported on the CPU", hint="use --precision fp32 on the CPU")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return Placement(target, dtype)
