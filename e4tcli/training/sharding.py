"""The trained weights whole, whether each process holds all of them (one
process, DDP) or a shard (FSDP, DeepSpeed ZeRO; see ``deepspeed_state``).

Checkpoints always hold full tensors, so a run saved under FSDP on 8 GPUs
resumes on 1 GPU or under DDP, and its weights are a plain domain checkpoint.
PyTorch's ``torch.distributed.checkpoint.state_dict`` does the gathering and
the re-sharding for every wrapper; the calls are collective, so every process
makes them, and only the main process receives the tensors.
"""

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from e4tcli.errors import UsageError

FULL_ON_MAIN = dict(full_state_dict=True, cpu_offload=True)


def keep_trainable_weights_fp32(accelerator) -> None:
    """Under FSDP, leave mixed precision to autocast, as without FSDP.

    accelerate hands FSDP a policy that casts the sharded parameters to
    fp16/bf16 for each forward pass. e4t's trained weights stay fp32 (they are
    the master weights, the optimizer state and the checkpoint), the frozen
    model is already stored in the low precision, and the encoder runs in fp32
    on purpose, so the cast weights would meet fp32 inputs. Dropping the policy
    before ``prepare`` keeps ``--precision`` meaning the same under FSDP.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None:
        plugin.mixed_precision_policy = None


def gather_full_state(parts: nn.Module, optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts (on CPU) on the main process, ``{}`` elsewhere. Collective.

    Keys are ``parts``' parameter names, also in the optimizer state.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from e4tcli.training.deepspeed_state import deepspeed_engine, gather_deepspeed_state

    engine = deepspeed_engine(parts)
    if engine is not None:
        return gather_deepspeed_state(engine)
    options = StateDictOptions(**FULL_ON_MAIN)
    return get_model_state_dict(parts, options=options), get_optimizer_state_dict(parts, optimizer, options=options)


def load_full_state(parts: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load full state dicts (as ``gather_full_state`` returns them) into every process's shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from e4tcli.training.deepspeed_state import deepspeed_engine, load_deepspeed_state

    engine = deepspeed_engine(parts)
    if engine is not None:
        if optimizer_state["state"] and all(isinstance(key, int) for key in optimizer_state["state"]):
            raise UsageError(
                "this checkpoint's optimizer state predates named parameters and cannot resume under DeepSpeed",
                hint="resume it once without DeepSpeed, or start a new run",
            )
        load_deepspeed_state(engine, model_state, optimizer_state)
        return
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(parts, model_state, options=options)
    if all(isinstance(key, int) for key in optimizer_state["state"]):
        optimizer.load_state_dict(optimizer_state)  # written before checkpoints named their parameters
    else:
        set_optimizer_state_dict(parts, optimizer, optimizer_state, options=options)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (collective), or the tensor itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(full: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """``full`` cut into the shard this process holds of ``parameter``."""
    if not is_sharded(parameter):
        return full.to(parameter.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(parameter.to_local().device), parameter.device_mesh, parameter.placements)


@contextmanager
def whole_parameters(parts: nn.Module) -> Iterator[None]:
    """Every process holds every parameter inside the block (for work outside ``parts.forward``). Collective."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(parts, FSDPModule):
        parts.unshard()
        try:
            yield
        finally:
            parts.reshard()
    elif isinstance(parts, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(parts, writeback=False):
            yield
    else:
        yield
