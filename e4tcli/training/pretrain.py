"""Pre-training a domain: underfit many concepts, each training image its own concept.

Runs on HuggingFace accelerate: one process by default, many GPUs or nodes
under ``accelerate launch`` (DDP, FSDP or DeepSpeed ZeRO-0/1/2 from its
config; see ``sharding`` and ``deepspeed_state``).
Only the encoder and the weight offsets are wrapped for distribution; the
frozen base model is never replicated into the optimizer.

Reproducibility is by construction, not by saved RNG state: the global batch
of step ``s`` (which images, flips, prompts) is drawn from ``seed`` and ``s``,
and each sample's latent noise, diffusion noise and timestep from its own
seed. So N processes sharing a global batch compute what one process would,
and a run resumed from a checkpoint repeats exactly what the uninterrupted run
would have done.
"""

import functools
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from e4tcli.domain import PLACEHOLDER, fill_template, plain_templates, template_fields
from e4tcli.errors import RuntimeFailure, UsageError
from e4tcli.io.training_state import prune_checkpoints, read_training_state, save_training_checkpoint
from e4tcli.models.e4t import E4TModel
from e4tcli.models.loading import Backbone, backbone_features
from e4tcli.models.weight_offsets import share_factors, unshare_factors
from e4tcli.memory import peak_rss_mb
from e4tcli.stopping import Interrupted, StopRequest
from e4tcli.training.data import (
    FeatureCache, MicroBatches, encode_arrays, loader, merge_skipped, next_micro_batch, stop_workers,
)
from e4tcli.training.deepspeed_state import configure_deepspeed, is_deepspeed
from e4tcli.training.images import square_resize
from e4tcli.training.sharding import (
    full_tensor, gather_full_state, keep_trainable_weights_fp32, load_full_state, shard_like,
    whole_parameters,
)
from e4tcli.training.step import Batch, StepLosses, training_step
from e4tcli.training.tune import TuneSettings


@dataclass
class PretrainSettings(TuneSettings):
    """The tuning settings (``batch_size`` being the global batch: per-device batch x
    processes x gradient accumulation; ``flip`` mirrors half the images), plus:"""

    gradient_accumulation: int = 1
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    keep_last: int = 3
    validate_every: int = 0
    """Every N steps, generate a grid for held-out images (0: never)."""
    validation_images: int = 4
    validation_steps: int = 20
    optimizer: str = "adamw"
    workers: int = 0
    """DataLoader worker processes decoding images (0: decode in the training process)."""
    cache_features: bool = False
    """Pre-compute every image's VAE posterior and backbone features once, into the run folder."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the trained weights (0: off); tuning then starts from it."""


@dataclass
class PlannedSample:
    index: int
    flip: bool
    template: str
    seed: int


def plan_step(step: int, settings: PretrainSettings, indices: Sequence[int], templates: Sequence[str]) -> list[PlannedSample]:
    """The global batch of ``step``: a pure function of (seed, step)."""
    rng = random.Random(f"{settings.seed}:{step}")
    return [
        PlannedSample(rng.choice(indices), settings.flip and rng.random() < 0.5, rng.choice(templates), rng.getrandbits(62))
        for _ in range(settings.batch_size)
    ]


def sample_prompt(template: str, metadata: Optional[dict], fallback: str) -> str:
    """``template`` with the image's metadata filled in, or ``fallback`` when it lacks a field."""
    if not template_fields(template):
        return template
    return fill_template(template, metadata) or fallback


def make_batch(model: E4TModel, mean, std, features, samples: list[PlannedSample], noise_scheduler,
               prompts: Optional[list[str]] = None) -> Batch:
    """A training batch from posterior statistics and backbone features, with each sample's own noise.

    ``prompts`` (default: the planned templates) are the filled-in templates."""
    device = model.placement.device
    latents, noise, timesteps = [], [], []
    for i, sample in enumerate(samples):
        generator = torch.Generator(device=device).manual_seed(sample.seed)
        latents.append(mean[i] + std[i] * torch.randn(mean[i].shape, generator=generator, device=device))
        noise.append(torch.randn(mean[i].shape, generator=generator, device=device))
        timesteps.append(
            torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=generator, device=device)
        )
    prompts = prompts or [sample.template for sample in samples]
    return Batch(
        latents=torch.stack(latents),
        image_features=features,
        prompt_ids=model.tokenize(prompts),
        class_prompt_ids=model.tokenize([p.replace(PLACEHOLDER, model.class_word) for p in prompts]),
        noise=torch.stack(noise),
        timesteps=torch.cat(timesteps),
    )


class TrainableParts(nn.Module):
    """The encoder and the offsets as ONE module, so DDP/FSDP see exactly the trained parameters."""

    def __init__(self, model: E4TModel):
        super().__init__()
        self.encoder = model.encoder
        self.offsets = nn.ModuleList(layer.offset for layer in model.offsets.values())
        self.offset_names = list(model.offsets)
        object.__setattr__(self, "model", model)

    def forward(self, batch: Batch, noise_scheduler, lambda_emb: float, lambda_weights: float):
        """The step's loss; the caller runs ``unshare_factors(model.offsets)`` after the backward pass."""
        share_factors(self.model.offsets)
        losses = training_step(self.model, batch, noise_scheduler, lambda_emb, lambda_weights)
        return losses.total, torch.stack([losses.total, losses.denoising, losses.embedding, losses.weights]).detach()

    def checkpoint_names(self, state: dict) -> dict:
        """This module's names ("offsets.3.row") -> the domain checkpoint's ("offsets.<layer path>.row")."""
        renamed = {}
        for key, value in state.items():
            if key.startswith("offsets."):
                _, index, rest = key.split(".", 2)
                key = f"offsets.{self.offset_names[int(index)]}.{rest}"
            renamed[key] = value
        return renamed

    def part_names(self, state: dict) -> dict:
        """The inverse of ``checkpoint_names``."""
        prefixes = {f"offsets.{name}.": f"offsets.{index}." for index, name in enumerate(self.offset_names)}
        renamed = {}
        for key, value in state.items():
            prefix = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
            renamed[prefixes[prefix] + key.removeprefix(prefix) if prefix else key] = value
        return renamed


def make_optimizer(parameters, settings: PretrainSettings):
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, foreach=True)
    if settings.optimizer == "adamw8bit":
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]  # hidden from peft by the CLI (e4tcli.cli.quiet)
        try:
            import bitsandbytes
        except ImportError:
            raise UsageError("--optimizer adamw8bit needs bitsandbytes", hint="pip install bitsandbytes") from None
        return bitsandbytes.optim.AdamW8bit(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    raise UsageError(f"unknown optimizer '{settings.optimizer}'", hint="use adamw or adamw8bit")


class TrainingLog:
    """Losses as JSON lines (always) and TensorBoard scalars (when tensorboard is installed)."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():  # drop what a resumed run will redo
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_validation_grid(model, backbone, dataset, indices, settings, templates, path: Path, preprocess=None) -> None:
    from e4tcli.io.atomic import atomic_file
    from e4tcli.pipeline import SamplingSettings, generate_images, image_grid

    images = []
    for index in indices:
        image = square_resize(preprocess(dataset[index]) if preprocess else dataset[index], settings.resolution)
        features = backbone_features(backbone, [image], model.encoder_config.backbone_layers)
        sampling = SamplingSettings(
            prompt=templates[0], seed=settings.seed, steps=settings.validation_steps,
            height=settings.resolution, width=settings.resolution,
        )
        images += [image] + generate_images(model, features[0], sampling)
    with atomic_file(path) as tmp:
        image_grid(images).save(tmp, format="PNG")


def pretrain_domain(
    model: E4TModel,
    backbone: Backbone,
    dataset: Sequence,
    prompt_templates: tuple[str, ...],
    settings: PretrainSettings,
    noise_scheduler,
    run_dir: Path,
    checkpoint_config: dict,
    accelerator,
    preprocess: Optional[Callable] = None,
    resume: Optional[Path] = None,
    on_step: Optional[Callable[[int, object], None]] = None,
    fallback_templates: Sequence[str] = (),
) -> tuple[list[dict], Path]:
    """Train the encoder and the shared offsets; return each step's losses and the last checkpoint.

    An image lacking a template's fields is prompted with the first of ``prompt_templates``
    without fields, or of ``fallback_templates`` when every one has fields."""
    keep_trainable_weights_fp32(accelerator)
    world = accelerator.num_processes
    per_device, remainder = divmod(settings.batch_size, world * settings.gradient_accumulation)
    if remainder or per_device == 0:
        raise UsageError(
            f"batch size {settings.batch_size} does not split over {world} processes x "
            f"{settings.gradient_accumulation} accumulation steps",
            hint="make --batch-size a multiple of processes x --gradient-accumulation",
        )
    if is_deepspeed(accelerator):
        configure_deepspeed(accelerator, per_device, settings.gradient_accumulation, settings.optimizer)
    held = settings.validation_images if settings.validate_every and settings.validation_images > 0 else 0
    held_out = list(range(max(0, len(dataset) - held), len(dataset)))
    train_indices = list(range(len(dataset) - len(held_out))) or list(range(len(dataset)))

    torch.manual_seed(settings.seed)
    trainable = TrainableParts(model)
    optimizer = make_optimizer(trainable.parameters(), settings)
    parts, optimizer = accelerator.prepare(trainable, optimizer)
    start, ema = 0, None
    parameters = model.named_trainable_parameters()
    if resume is not None:
        state = read_training_state(resume, checkpoint_config)
        load_full_state(parts, optimizer, trainable.part_names(state.tensors), state.optimizer)
        if accelerator.scaler is not None and state.scaler:
            accelerator.scaler.load_state_dict(state.scaler)
        start = state.step
        if state.ema is not None:
            ema = {name: shard_like(state.ema[name], parameters[name]) for name in parameters}
    if settings.ema_decay and ema is None:
        ema = {name: p.detach().float().clone() for name, p in parameters.items()}
    if ema is not None:
        ema = {name: value.to(accelerator.device) for name, value in ema.items()}
    main = accelerator.is_main_process
    log = TrainingLog(run_dir, start, enabled=main)
    history, last_checkpoint = [], resume
    rank = accelerator.process_index

    def save(step: int) -> Path:
        folder = run_dir / f"checkpoint-{step:07d}"
        model_state, optimizer_state = gather_full_state(parts, optimizer)
        whole_ema = {name: full_tensor(value).cpu() for name, value in ema.items()} if ema is not None else None
        if main:
            config = {**checkpoint_config, "step": step}
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            tensors = {key: value.detach().clone() for key, value in trainable.checkpoint_names(model_state).items()}
            save_training_checkpoint(folder, config, tensors, optimizer_state, whole_ema, scaler)
            prune_checkpoints(run_dir, settings.keep_last)
        accelerator.wait_for_everyone()
        return folder

    plan = functools.partial(plan_step, settings=settings, indices=train_indices, templates=prompt_templates)
    plain = plain_templates(prompt_templates) or plain_templates(tuple(fallback_templates))
    with_metadata = any(template_fields(template) for template in prompt_templates)
    cache = None
    if settings.cache_features:
        cache = FeatureCache(run_dir / "cache")
        key = {"base": checkpoint_config["base_model"]["fingerprint"], "backbone": checkpoint_config["backbone"]["fingerprint"],
               "resolution": settings.resolution, "images": len(dataset), "data": str(getattr(dataset, "root", "")),
               "metadata": with_metadata}
        if not cache.matches(key):
            cache.build(key, dataset, len(dataset), lambda arrays: encode_arrays(model, backbone, arrays),
                        settings.resolution, preprocess, rank, world, with_metadata)
            accelerator.wait_for_everyone()
            if main:
                cache.finish(key)
        accelerator.wait_for_everyone()
        micro_batches = None
    else:
        source = MicroBatches(dataset, plan, start + 1, settings.steps, settings.gradient_accumulation, world, rank,
                              per_device, settings.resolution, preprocess, with_metadata)
        micro_batches = iter(loader(source, settings.workers, pin_memory=accelerator.device.type == "cuda"))

    try:
        with StopRequest() as stop:
            for step in range(start + 1, settings.steps + 1):
                began = time.perf_counter()
                step_plan = plan(step)
                step_losses = []
                for micro in range(settings.gradient_accumulation):
                    first = (micro * world + rank) * per_device
                    mine = step_plan[first : first + per_device]
                    if cache is not None:
                        *columns, metadata = zip(*(cache.lookup(sample.index, sample.flip) for sample in mine))
                        mean, std, features = (torch.stack(column).to(accelerator.device) for column in columns)
                    else:
                        arrays, found_unreadable, metadata = next_micro_batch(micro_batches)
                        merge_skipped(dataset, found_unreadable)
                        mean, std, features = encode_arrays(model, backbone, list(arrays.numpy()))
                    prompts = [sample_prompt(sample.template, record, plain[0]) for sample, record in zip(mine, metadata)]
                    batch = make_batch(model, mean, std, features, mine, noise_scheduler, prompts)
                    with accelerator.accumulate(parts):
                        try:
                            total, parts_losses = parts(batch, noise_scheduler, settings.lambda_emb, settings.lambda_weights)
                            if not math.isfinite(float(accelerator.reduce(parts_losses[0], "sum"))):
                                raise RuntimeFailure(
                                    f"the loss became non-finite at step {step}; "
                                    f"the last good checkpoint is {last_checkpoint or 'none (no checkpoint saved yet)'}",
                                    hint="lower --lr, use --precision bf16 or fp32, and --resume from that checkpoint",
                                )
                            accelerator.backward(total)
                        finally:
                            unshare_factors(model.offsets)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    step_losses.append(parts_losses)
                if ema is not None:
                    with torch.no_grad():
                        for name, parameter in parameters.items():
                            ema[name].lerp_(parameter.detach().float(), 1.0 - settings.ema_decay)
                mean = accelerator.reduce(torch.stack(step_losses).mean(0), "mean").tolist()
                seconds = time.perf_counter() - began
                record = {
                    "step": step, "loss": mean[0], "denoising": mean[1], "embedding": mean[2], "weights": mean[3],
                    "lr": settings.learning_rate, "seconds": round(seconds, 4),
                    "images_per_second": round(settings.batch_size / seconds, 2),
                    "peak_rss_mb": peak_rss_mb(),
                }
                history.append(record)
                log.write(record)
                if on_step is not None and main:
                    on_step(step, StepLosses(*(torch.tensor(value) for value in mean)))
                stopping = accelerator.reduce(
                    torch.tensor([1.0 if stop.signal_name else 0.0], device=accelerator.device), "sum"
                ).item() > 0
                periodic = settings.checkpoint_every and step % settings.checkpoint_every == 0
                if periodic or step == settings.steps or stopping:
                    last_checkpoint = save(step)
                if settings.validate_every and step % settings.validate_every == 0 and held_out:
                    with whole_parameters(parts):
                        if main:
                            save_validation_grid(
                                model, backbone, dataset, held_out, settings, plain,
                                run_dir / "validation" / f"step-{step:07d}.png", preprocess,
                            )
                    accelerator.wait_for_everyone()
                if stopping:
                    raise Interrupted(
                        f"stopped by {stop.signal_name or 'a signal'} after step {step}; "
                        f"resumable checkpoint saved at {last_checkpoint}",
                        signal_name=stop.signal_name or "SIGINT",
                        hint="continue with the same command and --resume latest",
                    )
    finally:
        stop_workers(micro_batches)
        log.close()
    if last_checkpoint is None:
        last_checkpoint = save(settings.steps)
    return history, Path(last_checkpoint)
