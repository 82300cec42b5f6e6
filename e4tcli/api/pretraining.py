"""`e4t pretrain` as a library call: options and a Domain in, a domain checkpoint out."""

import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from e4tcli import __version__
from e4tcli.api.common import (
    DOMAIN_DEFAULTED,
    OnStep,
    bias_rate,
    enable_gradient_checkpointing,
    new_model,
    phase_values,
    training_scheduler,
)
from e4tcli.domain import Domain
from e4tcli.errors import UsageError
from e4tcli.io.destinations import check_run_folder
from e4tcli.io.sources import portable_source
from e4tcli.options import PretrainOptions


@dataclass
class PretrainResult:
    checkpoint: Path
    steps: int
    seconds: float
    losses: list = field(repr=False)
    skipped_images: int = 0


def make_accelerator(device: Optional[str], precision: str, gradient_accumulation: int):
    """An accelerate Accelerator and the Placement (device, frozen-weight dtype) that matches it.

    Device and precision are chosen exactly as for tune and generate. Under
    ``accelerate launch`` each process gets its own GPU from accelerate.
    """
    import os
    from datetime import timedelta

    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs

    from e4tcli.device import Placement, choose_placement
    from e4tcli.training.deepspeed_state import refuse_unsupported_deepspeed

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if deepspeed and device == "cpu" and torch.cuda.is_available():
        raise UsageError(
            "--device cpu turns DeepSpeed off on a machine with GPUs",
            hint="omit --device under DeepSpeed; accelerate gives each process its GPU",
        )
    if deepspeed and precision == "auto" and torch.cuda.is_available():
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"  # not fp16: see training.deepspeed_state
    chosen = choose_placement(None if distributed and device != "cpu" else device, precision)
    if chosen.device.type == "cuda" and chosen.device.index is not None and not distributed:
        torch.cuda.set_device(chosen.device)
    mixed = {torch.float32: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[chosen.dtype]
    # accelerate turns DeepSpeed off when told cpu=True; on a machine without GPUs, DeepSpeed runs on
    # the CPU over gloo once accelerate is told that backend (it finds none of its own there)
    deepspeed_on_cpu = deepspeed and not torch.cuda.is_available()
    # rank 0 alone writes checkpoints, validation grids and the feature cache: give it time
    process_group = InitProcessGroupKwargs(
        timeout=timedelta(hours=2), **({"backend": "gloo"} if deepspeed_on_cpu else {})
    )
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=gradient_accumulation,
        cpu=chosen.device.type == "cpu" and not deepspeed_on_cpu,
        kwargs_handlers=[process_group],
    )
    refuse_unsupported_deepspeed(accelerator, chosen.dtype)
    device_used = chosen.device if chosen.device.type == "cuda" and not distributed else accelerator.device
    return accelerator, Placement(device_used, chosen.dtype)


def pretrain(options: PretrainOptions, domain: Domain, on_step: OnStep = None) -> PretrainResult:
    import torch

    from e4tcli.io.training_state import resolve_resume
    from e4tcli.models.loading import load_backbone, load_base_model
    from e4tcli.training.deepspeed_state import refuse_deepspeed_bias_changes
    from e4tcli.training.pretrain import PretrainJob, PretrainRun, PretrainSettings

    start = time.perf_counter()
    run_dir = Path(options.out)
    if os.environ.get("RANK", "0") == "0":  # the other processes find the files rank 0 writes
        check_run_folder(run_dir, options.resume, options.force)
    resume = resolve_resume(run_dir, options.resume) if options.resume else None
    dataset = domain.dataset(options.data)
    accelerator, placement = make_accelerator(options.device, options.precision, options.gradient_accumulation)
    refuse_deepspeed_bias_changes(
        accelerator, bias_rate(options.bias_learning_rate, domain.pretrain.bias_learning_rate)
    )
    base = load_base_model(options.base_model or domain.base_model, placement.device, placement.dtype)
    backbone = load_backbone(options.backbone or domain.backbone, placement.device, placement.dtype)
    torch.manual_seed(options.seed)
    model = new_model(
        base,
        backbone,
        domain,
        placement,
        encoder_hidden_dim=options.encoder_hidden_dim,
        encoder_scale=options.encoder_scale,
        offsets=options.offsets,
        offset_rank=options.offset_rank,
        offset_layers=options.offset_layers,
    )
    if options.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    defaults = domain.pretrain
    resolution = options.resolution if options.resolution is not None else defaults.resolution
    copied = {
        f.name: getattr(options, f.name)
        for f in fields(PretrainSettings)
        if hasattr(options, f.name) and f.name not in DOMAIN_DEFAULTED
    }
    settings = PretrainSettings(**phase_values(options, defaults, domain), resolution=resolution, **copied)
    recipe = {**asdict(options), "domain": domain.name}
    config = {
        "domain": domain.name,
        "class_word": domain.class_word,
        "base_model": {
            "source": portable_source(base.source, domain.name, domain.base_model),
            "fingerprint": base.fingerprint,
        },
        "backbone": {
            "source": portable_source(backbone.source, domain.name, domain.backbone),
            "fingerprint": backbone.fingerprint,
        },
        **model.describe(),
        "training": {**asdict(settings), "precision": options.precision, "processes": accelerator.num_processes},
        "recipe": recipe,
        "e4t_version": __version__,
    }
    job = PretrainJob(
        model=model,
        backbone=backbone,
        dataset=dataset,
        prompt_templates=domain.pretrain_templates or domain.prompt_templates,
        settings=settings,
        noise_scheduler=training_scheduler(base),
        run_dir=run_dir,
        checkpoint_config=config,
        accelerator=accelerator,
        resume=resume,
        fallback_templates=domain.prompt_templates,
    )
    run = PretrainRun(job)  # refuses a checkpoint this run cannot resume before the run's recipe is replaced
    if accelerator.is_main_process:
        write_recipe(run_dir / "recipe.yaml", recipe)
    losses, checkpoint = run.train(on_step)
    skipped = len(getattr(dataset, "skipped", []))
    return PretrainResult(checkpoint, settings.steps, time.perf_counter() - start, losses, skipped)


def write_recipe(path: Path, recipe: dict) -> None:
    import yaml

    from e4tcli.io.atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(recipe, sort_keys=False))
