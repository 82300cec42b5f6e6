"""Pre-training under DeepSpeed ZeRO (stages 0-2), with e4t's own checkpoints.

accelerate's DeepSpeed config is fitted to e4t before ``prepare``: the batch
split comes from ``--batch-size`` and ``--gradient-accumulation``, and the
engine keeps the trained weights in fp32 while autocast runs the low
precision, as under DDP and FSDP (DeepSpeed's own fp16/bf16 modes would cast
the encoder). Checkpoints hold the full weights and Adam moments under their
parameter names, gathered from ZeRO's partitions, so a run saved under
DeepSpeed on 8 GPUs resumes under DDP on 1, and the other way round.

ZeRO-3 is refused: it partitions the parameters themselves, which e4t reads
outside the forward pass of the module that holds them (offsets shared across
layers, EMA), and the trained parts (at most ~174 M parameters) fit on any
GPU that runs the frozen model.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from e4tcli.errors import UsageError

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def deepspeed_engine(parts) -> "object | None":
    """``parts`` itself when ``prepare`` made it a DeepSpeed engine, else None."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed import DeepSpeedEngine

    return parts if isinstance(parts, DeepSpeedEngine) else None


def refuse_unsupported_deepspeed(accelerator, dtype: torch.dtype) -> None:
    """Called before any model is loaded (under ZeRO-3, transformers would partition the frozen models too)."""
    if not is_deepspeed(accelerator):
        return
    stage = int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))
    if stage > 2:
        raise UsageError(
            f"e4t pretrain runs under DeepSpeed ZeRO stages 0-2, not stage {stage}",
            hint="use --zero_stage 2 (the trained encoder and offsets are small), or FSDP to shard them",
        )
    if dtype == torch.float16:
        # seen with deepspeed 0.19.8: once a step overflows, its autocast gradient scaler is never
        # lowered, so every later step is skipped as well
        raise UsageError("e4t pretrain does not run fp16 under DeepSpeed", hint="use --precision bf16 (or fp32)")


def configure_deepspeed(accelerator, micro_batch: int, accumulation: int, dtype: torch.dtype, optimizer: str) -> None:
    """Fit the DeepSpeed config accelerate built (from ``accelerate launch`` or a config file) to e4t."""
    refuse_unsupported_deepspeed(accelerator, dtype)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = config.setdefault("zero_optimization", {})
    if optimizer != "adamw":
        raise UsageError(f"--optimizer {optimizer} does not run under DeepSpeed", hint="use --optimizer adamw")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise UsageError(
                f"the DeepSpeed config sets '{section}', but e4t builds its own",
                hint=f"remove '{section}' from the DeepSpeed config; set the learning rate with --lr",
            )
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro_batch * accumulation * accelerator.num_processes
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = 0.0  # e4t clips nothing, under any launcher
    config["fp16"] = {"enabled": False}
    config["bf16"] = {"enabled": False}
    if dtype == torch.bfloat16:
        # fp32 weights and autocast in the forward pass; no module is marked for low-precision
        # gradient reduction, so gradients are reduced in fp32, as under DDP
        config["torch_autocast"] = {"enabled": True, "dtype": "bf16", "lower_precision_safe_modules": []}
    else:
        config.pop("torch_autocast", None)
    if zero.get("reduce_bucket_size") == "auto":
        zero["reduce_bucket_size"] = 500_000_000  # accelerate would size it from a model config e4t's parts lack


def _full_weight(parameter: nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(parameter)
    return (parameter.detach() if full is None else full).float()


def _torch_optimizer(engine):
    """The torch optimizer inside ZeRO's: its state is keyed by ZeRO's flat fp32 partitions
    (by the parameters themselves at stage 0, where the engine uses it directly)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _partitioned(parameter: nn.Parameter) -> bool:
    """ZeRO keeps this parameter's master copy in partitions (this process may hold none of it)."""
    return hasattr(parameter, "_hp_mapping") or hasattr(parameter, "ds_id")


def gather_deepspeed_state(engine) -> tuple[dict, dict]:
    """Full weights and optimizer state dicts on every process (CPU tensors). Collective.

    The optimizer state has ``torch.distributed.checkpoint``'s full layout,
    keyed by parameter name, so checkpoints written under DeepSpeed and
    under DDP/FSDP are interchangeable.
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = _torch_optimizer(engine)
    started = bool(inner.state)
    step = _optimizer_step(inner)
    model_state, state = {}, {}
    for name, parameter in engine.module.named_parameters():
        model_state[name] = _full_weight(parameter).cpu()
        if not started:
            continue
        if _partitioned(parameter):
            moments = {key: safe_get_full_optimizer_state(parameter, key) for key in ADAM_MOMENTS}
        else:
            moments = {key: inner.state[parameter][key] for key in ADAM_MOMENTS}
        state[name] = {"step": step.clone(), **{key: value.float().cpu() for key, value in moments.items()}}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": list(model_state)}
              for group in inner.param_groups[:1]]
    return model_state, {"state": state, "param_groups": groups}


def _optimizer_step(inner) -> torch.Tensor:
    for values in inner.state.values():
        if "step" in values:
            return torch.as_tensor(values["step"], dtype=torch.float32).detach().cpu()
    return torch.tensor(0.0)


def load_deepspeed_state(engine, model_state: dict, optimizer_state: dict) -> None:
    """Load full state dicts (as ``gather_deepspeed_state`` returns them) into every process's partition."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    inner = _torch_optimizer(engine)
    named = dict(engine.module.named_parameters())
    missing = sorted(set(named) - set(model_state))
    if missing:
        raise UsageError(f"the checkpoint lacks {len(missing)} trained weights (first: {missing[0]})",
                         hint="resume with the same --offsets, --offset-rank and --offset-layers")
    with torch.no_grad():
        for name, parameter in named.items():
            value = model_state[name].to(device=parameter.device, dtype=torch.float32)
            parameter.data.copy_(value.to(parameter.dtype))  # the weights the forward pass reads
            safe_set_full_fp32_param(parameter, value)  # ZeRO's fp32 master partition
    saved = optimizer_state["state"]
    if not saved:
        return
    step = torch.as_tensor(next(iter(saved.values()))["step"], dtype=torch.float32)
    for group in inner.param_groups:
        for flat in group["params"]:
            inner.state[flat] = {"step": step.clone(), **{key: torch.zeros_like(flat) for key in ADAM_MOMENTS}}
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 point each parameter at its slice of the new state
        engine.optimizer._hp_optimizer_states_linked = False
        link()
    with torch.no_grad():
        for name, parameter in named.items():
            for key in ADAM_MOMENTS:
                value = torch.as_tensor(saved[name][key]).to(parameter.device, torch.float32)
                if _partitioned(parameter):
                    safe_set_full_optimizer_state(parameter, value, key)
                else:
                    inner.state[parameter][key].copy_(value)
