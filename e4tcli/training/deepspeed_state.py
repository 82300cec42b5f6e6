"""Pre-training under DeepSpeed ZeRO (stages 0-2), with e4t's own checkpoints.

accelerate's DeepSpeed config is fitted to e4t before ``prepare``: the batch
split comes from ``--batch-size`` and ``--gradient-accumulation``, and the
engine runs in fp32 while e4t's own autocast runs the model calls in bf16, as
under DDP and FSDP (DeepSpeed's fp16/bf16 modes would cast the encoder, and
its torch_autocast mode would also cast e4t's fp32 offset arithmetic).
Checkpoints hold the full weights and Adam moments under their parameter
names, gathered from ZeRO's partitions, so a run saved under DeepSpeed on 8
GPUs resumes under DDP on 1, and the other way round.

ZeRO-3 is refused: under it, transformers partitions the frozen models as they
load (the tiny models' loading then failed), e4t reads the trained parameters
outside their modules' forward passes (shared offsets, EMA), and the trained
parts (at most ~174 M parameters) gain nothing from it that ZeRO-2 or FSDP
does not give.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from e4tcli.errors import RuntimeFailure, UsageError

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def deepspeed_engine(parts) -> object | None:
    """``parts`` itself when ``prepare`` made it a DeepSpeed engine, else None."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed import DeepSpeedEngine

    return parts if isinstance(parts, DeepSpeedEngine) else None


def refuse_unsupported_deepspeed(accelerator, dtype: torch.dtype) -> None:
    """Called before any model is loaded (under ZeRO-3, transformers would partition the frozen models too)."""
    if not is_deepspeed(accelerator):
        return
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage > 2:
        raise UsageError(
            f"e4t pretrain runs under DeepSpeed ZeRO stages 0-2, not stage {stage}",
            hint="use --zero_stage 2 (the trained encoder and offsets are small), or FSDP to shard them",
        )
    for section in ("offload_optimizer", "offload_param"):
        if str(zero.get(section, {}).get("device", "none")).lower() not in ("none", "auto"):
            raise UsageError(
                f"e4t pretrain does not run with DeepSpeed's {section}",
                hint="set its device to none (the trained parts are small)",
            )
    if dtype == torch.float16:
        # seen with deepspeed 0.19.8: its fp16 autocast scaler, once a step overflows, is never
        # lowered, so every later step is skipped as well
        raise UsageError("e4t pretrain does not run fp16 under DeepSpeed", hint="use --precision bf16 (or fp32)")


def refuse_deepspeed_bias_changes(accelerator, bias_learning_rate) -> None:
    """Pre-trained bias changes are a second parameter group, which e4t's gathering of ZeRO's optimizer
    state (one group) does not carry."""
    if bias_learning_rate is not None and is_deepspeed(accelerator):
        raise UsageError(
            "pre-training bias changes (--bias-lr) does not run under DeepSpeed",
            hint="launch without DeepSpeed (DDP or FSDP), or pass --bias-lr 0",
        )


def configure_deepspeed(accelerator, micro_batch: int, accumulation: int, optimizer: str) -> None:
    """Fit the DeepSpeed config accelerate built (from ``accelerate launch`` or a config file) to e4t."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if optimizer != "adamw":
        raise UsageError(f"--optimizer {optimizer} does not run under DeepSpeed", hint="use --optimizer adamw")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise UsageError(
                f"the DeepSpeed config sets '{section}', but e4t builds its own",
                hint=f"remove '{section}' from the DeepSpeed config; set the learning rate with --lr",
            )
    split = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * accelerator.num_processes,
    }
    for key, value in split.items():
        chosen = config.get(key, "auto")
        accelerate_default = key == "gradient_accumulation_steps" and chosen == 1
        if chosen != "auto" and not accelerate_default and int(chosen) != value:
            raise UsageError(
                f"the DeepSpeed config sets {key} to {chosen}, but e4t's batch split gives {value}",
                hint="remove it from the DeepSpeed config; --batch-size and --gradient-accumulation set it",
            )
    config.update(split)
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = 0.0  # e4t clips nothing, under any launcher
    config["fp16"] = {"enabled": False}
    config["bf16"] = {"enabled": False}
    config["torch_autocast"] = {"enabled": False}
    zero = config.setdefault("zero_optimization", {})
    if zero.get("reduce_bucket_size") == "auto":
        zero["reduce_bucket_size"] = 500_000_000  # accelerate would size it from a model config e4t's parts lack


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def _full_weight(parameter: nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(parameter)
    return (parameter.detach() if full is None else full).float()


def _torch_optimizer(engine):
    """The torch optimizer inside ZeRO's: its state is keyed by ZeRO's flat fp32 partitions
    (by the parameters themselves at stage 0, where the engine uses it directly)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _partitioned(parameter: nn.Parameter) -> bool:
    """ZeRO-1/2 keep this parameter's master copy in partitions (this process may hold none of it)."""
    return hasattr(parameter, "_hp_mapping")


def gather_deepspeed_state(engine) -> tuple[dict, dict]:
    """Full weights and optimizer state dicts (CPU tensors) on the main process, ``{}`` elsewhere. Collective.

    The optimizer state has ``torch.distributed.checkpoint``'s full layout,
    keyed by parameter name, so checkpoints written under DeepSpeed and
    under DDP/FSDP are interchangeable.
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = _torch_optimizer(engine)
    keep = torch.distributed.get_rank() == 0
    started = bool(inner.state)
    step = _optimizer_step(inner)
    model_state, state = {}, {}
    for name, parameter in engine.module.named_parameters():
        weight = _full_weight(parameter)  # every process takes part in each gather, in the same order
        if started and _partitioned(parameter):
            moments = {key: safe_get_full_optimizer_state(parameter, key) for key in ADAM_MOMENTS}
        elif started:
            moments = {key: inner.state[parameter][key] for key in ADAM_MOMENTS}
        if not keep:
            continue
        model_state[name] = weight.cpu()
        if started:
            state[name] = {"step": step.clone(), **{key: value.float().cpu() for key, value in moments.items()}}
    if not keep:
        return {}, {}
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": list(model_state)}
        for group in inner.param_groups[:1]
    ]
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
        raise UsageError(
            f"the checkpoint lacks {len(missing)} trained weights (first: {missing[0]})",
            hint="resume with the same --offsets, --offset-rank and --offset-layers",
        )
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
    if any(_partitioned(p) for p in named.values()):
        # ZeRO-1/2 point each parameter at its slice of the new state (a private step, tested on 0.19.8)
        link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is None:
            raise RuntimeFailure(
                f"this DeepSpeed ({_deepspeed_version()}) cannot be resumed by e4t",
                hint="install deepspeed==0.19.8, the version e4t is tested with",
            )
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
