"""Pre-training a domain: underfit many concepts, each training image its own concept.

Runs on HuggingFace accelerate: one process by default, many GPUs or nodes
under ``accelerate launch`` (DDP, FSDP or DeepSpeed ZeRO-0/1/2 from its
config; see ``sharding`` and ``deepspeed_state``).
Only the encoder, the weight offsets and (``--bias-lr``) the bias changes are
wrapped for distribution; the frozen base model is never replicated into the
optimizer.

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
from e4tcli.memory import peak_rss_mb
from e4tcli.models.bias_offsets import PREFIX as BIAS_PREFIX
from e4tcli.models.e4t import E4TModel
from e4tcli.models.loading import Backbone, backbone_features
from e4tcli.models.weight_offsets import share_factors, unshare_factors
from e4tcli.stopping import Interrupted, StopRequest
from e4tcli.training.data import (
    FeatureCache,
    MicroBatches,
    encode_arrays,
    loader,
    merge_skipped,
    next_micro_batch,
    stop_workers,
)
from e4tcli.training.deepspeed_state import configure_deepspeed, is_deepspeed
from e4tcli.training.images import square_resize
from e4tcli.training.sharding import (
    full_tensor,
    gather_full_state,
    keep_trainable_weights_fp32,
    load_full_state,
    shard_like,
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


def plan_step(
    step: int, settings: PretrainSettings, indices: Sequence[int], templates: Sequence[str]
) -> list[PlannedSample]:
    """The global batch of ``step``: a pure function of (seed, step)."""
    rng = random.Random(f"{settings.seed}:{step}")
    return [
        PlannedSample(
            rng.choice(indices), settings.flip and rng.random() < 0.5, rng.choice(templates), rng.getrandbits(62)
        )
        for _ in range(settings.batch_size)
    ]


def sample_prompt(template: str, metadata: Optional[dict], fallback: str) -> str:
    """``template`` with the image's metadata filled in, or ``fallback`` when it lacks a field."""
    if not template_fields(template):
        return template
    return fill_template(template, metadata) or fallback


def make_batch(
    model: E4TModel,
    mean,
    std,
    features,
    samples: list[PlannedSample],
    noise_scheduler,
    prompts: Optional[list[str]] = None,
) -> Batch:
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
    """The encoder, the offsets and the bias changes (when the model has them) as ONE module, so DDP/FSDP
    see exactly the trained parameters."""

    def __init__(self, model: E4TModel):
        super().__init__()
        self.encoder = model.encoder
        self.offsets = nn.ModuleList(layer.offset for layer in model.offsets.values())
        self.offset_names = list(model.offsets)
        self.bias_names: list[str] = []
        if model.biases is not None:
            self.bias_names = list(model.biases.names)
            self.biases = model.biases.changes
        object.__setattr__(self, "model", model)

    def forward(self, batch: Batch, noise_scheduler, lambda_emb: float, lambda_weights: float):
        """The step's loss; the caller runs ``unshare_factors(model.offsets)`` after the backward pass."""
        share_factors(self.model.offsets)
        losses = training_step(self.model, batch, noise_scheduler, lambda_emb, lambda_weights)
        return losses.total, torch.stack([losses.total, losses.denoising, losses.embedding, losses.weights]).detach()

    def checkpoint_names(self, state: dict) -> dict:
        """This module's names ("offsets.3.row", "biases.7") -> the domain checkpoint's ("offsets.<layer
        path>.row", "biases.<module path>.bias")."""
        renamed = {}
        for key, value in state.items():
            if key.startswith("offsets."):
                _, index, rest = key.split(".", 2)
                key = f"offsets.{self.offset_names[int(index)]}.{rest}"
            elif key.startswith("biases."):
                key = BIAS_PREFIX + self.bias_names[int(key.removeprefix("biases."))]
            renamed[key] = value
        return renamed

    def part_names(self, state: dict) -> dict:
        """The inverse of ``checkpoint_names``."""
        prefixes = {f"offsets.{name}.": f"offsets.{index}." for index, name in enumerate(self.offset_names)}
        biases = {BIAS_PREFIX + name: f"biases.{index}" for index, name in enumerate(self.bias_names)}
        renamed = {}
        for key, value in state.items():
            if key in biases:
                renamed[biases[key]] = value
                continue
            prefix = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
            renamed[prefixes[prefix] + key.removeprefix(prefix) if prefix else key] = value
        return renamed

    def parameter_groups(self, bias_learning_rate: Optional[float]) -> list[dict]:
        """One group at the run's rate; the bias changes in a second at ``bias_learning_rate`` if given."""
        if not self.bias_names or bias_learning_rate is None:
            return [{"params": list(self.parameters())}]
        changes = {id(p) for p in self.biases.parameters()}
        rest = [p for p in self.parameters() if id(p) not in changes]
        return [{"params": rest}, {"params": list(self.biases.parameters()), "lr": bias_learning_rate}]


def check_same_bias_changes(tensors: dict, pretrains_them: bool) -> None:
    """A run resumes only a checkpoint that holds bias changes exactly when it pre-trains them."""
    saved = any(key.startswith(BIAS_PREFIX) for key in tensors)
    if saved and not pretrains_them:
        raise UsageError(
            "the checkpoint pre-trains bias changes, this run does not",
            hint="resume with the --bias-lr the run started with",
        )
    if pretrains_them and not saved:
        raise UsageError(
            "this run pre-trains bias changes (--bias-lr), the checkpoint has none",
            hint="resume with --bias-lr 0, or start a new run",
        )


def make_optimizer(parameters, settings: PretrainSettings):
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(
            parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, foreach=True
        )
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
            prompt=templates[0],
            seed=settings.seed,
            steps=settings.validation_steps,
            height=settings.resolution,
            width=settings.resolution,
        )
        images += [image] + generate_images(model, sampling, image_features=features[0])
    with atomic_file(path) as tmp:
        image_grid(images).save(tmp, format="PNG")


@dataclass
class PretrainJob:
    """What one pre-training run trains and where it writes (``e4tcli.api.pretrain`` builds it)."""

    model: E4TModel
    backbone: Backbone
    dataset: Sequence
    prompt_templates: tuple[str, ...]
    settings: PretrainSettings
    noise_scheduler: object
    run_dir: Path
    checkpoint_config: dict
    accelerator: object
    preprocess: Optional[Callable] = None
    resume: Optional[Path] = None
    fallback_templates: Sequence[str] = ()
    """An image lacking a template's fields is prompted with the first of ``prompt_templates`` without
    fields, or of these when every one has fields."""


def pretrain_domain(
    job: PretrainJob, on_step: Optional[Callable[[int, object], None]] = None
) -> tuple[list[dict], Path]:
    """Train the encoder and the shared offsets; return each step's losses and the last checkpoint."""
    return PretrainRun(job).train(on_step)


class PretrainRun:
    """One run, in the parts a reader can hold in mind: setup (``__init__``), the images of a step
    (``micro_batch``), the step (``step``), checkpoints (``save``), validation (``validate``) and the loop
    (``train``). Construction order is the run's RNG order: resumed runs repeat it exactly."""

    def __init__(self, job: PretrainJob):
        self.job = job
        settings, accelerator, dataset = job.settings, job.accelerator, job.dataset
        keep_trainable_weights_fp32(accelerator)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.per_device, remainder = divmod(settings.batch_size, self.world * settings.gradient_accumulation)
        if remainder or self.per_device == 0:
            raise UsageError(
                f"batch size {settings.batch_size} does not split over {self.world} processes x "
                f"{settings.gradient_accumulation} accumulation steps",
                hint="make --batch-size a multiple of processes x --gradient-accumulation",
            )
        if is_deepspeed(accelerator):
            configure_deepspeed(accelerator, self.per_device, settings.gradient_accumulation, settings.optimizer)
        held = settings.validation_images if settings.validate_every and settings.validation_images > 0 else 0
        self.held_out = list(range(max(0, len(dataset) - held), len(dataset)))
        train_indices = list(range(len(dataset) - len(self.held_out))) or list(range(len(dataset)))

        torch.manual_seed(settings.seed)
        if settings.bias_learning_rate is not None:
            job.model.start_bias_offsets()
        self.trainable = TrainableParts(job.model)
        optimizer = make_optimizer(self.trainable.parameter_groups(settings.bias_learning_rate), settings)
        self.parts, self.optimizer = accelerator.prepare(self.trainable, optimizer)
        self.parameters = job.model.named_trainable_parameters()
        self.start, self.ema = self._restore()
        self.main = accelerator.is_main_process
        self.log = TrainingLog(job.run_dir, self.start, enabled=self.main)
        self.history: list[dict] = []
        self.last_checkpoint = job.resume

        self.plan = functools.partial(
            plan_step, settings=settings, indices=train_indices, templates=job.prompt_templates
        )
        self.plain = plain_templates(job.prompt_templates) or plain_templates(tuple(job.fallback_templates))
        self.with_metadata = any(template_fields(template) for template in job.prompt_templates)
        self.cache, self.micro_batches = self._feature_source()

    # ------------------------------------------------------------------ setup
    def _restore(self) -> tuple[int, Optional[dict]]:
        """The step to continue after and the EMA weights: from ``resume``, or fresh."""
        job, parameters = self.job, self.parameters
        start, ema = 0, None
        if job.resume is not None:
            state = read_training_state(job.resume, job.checkpoint_config)
            check_same_bias_changes(state.tensors, bool(self.trainable.bias_names))
            load_full_state(self.parts, self.optimizer, self.trainable.part_names(state.tensors), state.optimizer)
            if job.accelerator.scaler is not None and state.scaler:
                job.accelerator.scaler.load_state_dict(state.scaler)
            start = state.step
            if state.ema is not None:
                ema = {name: shard_like(state.ema[name], parameters[name]) for name in parameters}
        if job.settings.ema_decay and ema is None:
            ema = {name: p.detach().float().clone() for name, p in parameters.items()}
        if ema is not None:
            ema = {name: value.to(job.accelerator.device) for name, value in ema.items()}
        return start, ema

    def _feature_source(self):
        """The precomputed feature cache (built first if missing), or an iterator of decoded micro-batches."""
        job, settings, accelerator = self.job, self.job.settings, self.job.accelerator
        if not settings.cache_features:
            source = MicroBatches(
                job.dataset,
                self.plan,
                self.start + 1,
                settings.steps,
                settings.gradient_accumulation,
                self.world,
                self.rank,
                self.per_device,
                settings.resolution,
                job.preprocess,
                self.with_metadata,
            )
            return None, iter(loader(source, settings.workers, pin_memory=accelerator.device.type == "cuda"))
        cache = FeatureCache(job.run_dir / "cache")
        key = {
            "base": job.checkpoint_config["base_model"]["fingerprint"],
            "backbone": job.checkpoint_config["backbone"]["fingerprint"],
            "resolution": settings.resolution,
            "images": len(job.dataset),
            "data": str(getattr(job.dataset, "root", "")),
            "metadata": self.with_metadata,
        }
        if not cache.matches(key):
            cache.build(
                key,
                job.dataset,
                len(job.dataset),
                lambda arrays: encode_arrays(job.model, job.backbone, arrays),
                settings.resolution,
                job.preprocess,
                self.rank,
                self.world,
                self.with_metadata,
            )
            accelerator.wait_for_everyone()
            if self.main:
                cache.finish(key)
        accelerator.wait_for_everyone()
        return cache, None

    # ------------------------------------------------------------------ the step
    def micro_batch(self, mine: list) -> Batch:
        """The training batch of this process's samples ``mine``: features, noise, prompts."""
        job = self.job
        if self.cache is not None:
            *columns, metadata = zip(*(self.cache.lookup(sample.index, sample.flip) for sample in mine))
            mean, std, features = (torch.stack(column).to(job.accelerator.device) for column in columns)
        else:
            arrays, found_unreadable, metadata = next_micro_batch(self.micro_batches)
            merge_skipped(job.dataset, found_unreadable)
            mean, std, features = encode_arrays(job.model, job.backbone, list(arrays.numpy()))
        prompts = [sample_prompt(sample.template, record, self.plain[0]) for sample, record in zip(mine, metadata)]
        return make_batch(job.model, mean, std, features, mine, job.noise_scheduler, prompts)

    def step(self, step: int) -> list[float]:
        """One optimizer step over the global batch of ``step`` (its micro-batches accumulated), then the
        EMA; the losses (total, denoising, embedding, weights) averaged over micro-batches and processes."""
        settings, accelerator = self.job.settings, self.job.accelerator
        step_plan = self.plan(step)
        step_losses = []
        for micro in range(settings.gradient_accumulation):
            first = (micro * self.world + self.rank) * self.per_device
            batch = self.micro_batch(step_plan[first : first + self.per_device])
            with accelerator.accumulate(self.parts):
                try:
                    total, parts_losses = self.parts(
                        batch, self.job.noise_scheduler, settings.lambda_emb, settings.lambda_weights
                    )
                    if not math.isfinite(float(accelerator.reduce(parts_losses[0], "sum"))):
                        raise RuntimeFailure(
                            f"the loss became non-finite at step {step}; the last good checkpoint is "
                            f"{self.last_checkpoint or 'none (no checkpoint saved yet)'}",
                            hint="lower --lr, use --precision bf16 or fp32, and --resume from that checkpoint",
                        )
                    accelerator.backward(total)
                finally:
                    unshare_factors(self.job.model.offsets)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            step_losses.append(parts_losses)
        if self.ema is not None:
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    self.ema[name].lerp_(parameter.detach().float(), 1.0 - settings.ema_decay)
        return accelerator.reduce(torch.stack(step_losses).mean(0), "mean").tolist()

    # ------------------------------------------------------------------ checkpoints and validation
    def save(self, step: int) -> Path:
        """A resumable checkpoint: the full weights, optimizer state and EMA gathered from every process."""
        job = self.job
        folder = job.run_dir / f"checkpoint-{step:07d}"
        model_state, optimizer_state = gather_full_state(self.parts, self.optimizer)
        whole_ema = {name: full_tensor(value).cpu() for name, value in self.ema.items()} if self.ema else None
        if self.main:
            config = {**job.checkpoint_config, "step": step}
            scaler = job.accelerator.scaler.state_dict() if job.accelerator.scaler is not None else None
            tensors = {k: v.detach().clone() for k, v in self.trainable.checkpoint_names(model_state).items()}
            save_training_checkpoint(folder, config, tensors, optimizer_state, whole_ema, scaler)
            prune_checkpoints(job.run_dir, job.settings.keep_last)
        job.accelerator.wait_for_everyone()
        return folder

    def validate(self, step: int) -> None:
        job = self.job
        with whole_parameters(self.parts):
            if self.main:
                save_validation_grid(
                    job.model,
                    job.backbone,
                    job.dataset,
                    self.held_out,
                    job.settings,
                    self.plain,
                    job.run_dir / "validation" / f"step-{step:07d}.png",
                    job.preprocess,
                )
        job.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ the loop
    def train(self, on_step: Optional[Callable[[int, object], None]] = None) -> tuple[list[dict], Path]:
        settings, accelerator = self.job.settings, self.job.accelerator
        try:
            with StopRequest() as stop:
                for step in range(self.start + 1, settings.steps + 1):
                    began = time.perf_counter()
                    mean = self.step(step)
                    self._record(step, mean, time.perf_counter() - began, on_step)
                    flag = torch.tensor([1.0 if stop.signal_name else 0.0], device=accelerator.device)
                    stopping = accelerator.reduce(flag, "sum").item() > 0
                    periodic = settings.checkpoint_every and step % settings.checkpoint_every == 0
                    if periodic or step == settings.steps or stopping:
                        self.last_checkpoint = self.save(step)
                    if settings.validate_every and step % settings.validate_every == 0 and self.held_out:
                        self.validate(step)
                    if stopping:
                        raise Interrupted(
                            f"stopped by {stop.signal_name or 'a signal'} after step {step}; "
                            f"resumable checkpoint saved at {self.last_checkpoint}",
                            signal_name=stop.signal_name or "SIGINT",
                            hint="continue with the same command and --resume latest",
                        )
        finally:
            stop_workers(self.micro_batches)
            self.log.close()
        if self.last_checkpoint is None:
            self.last_checkpoint = self.save(settings.steps)
        return self.history, Path(self.last_checkpoint)

    def _record(self, step: int, mean: list[float], seconds: float, on_step) -> None:
        settings = self.job.settings
        record = {
            "step": step,
            "loss": mean[0],
            "denoising": mean[1],
            "embedding": mean[2],
            "weights": mean[3],
            "lr": settings.learning_rate,
            "seconds": round(seconds, 4),
            "images_per_second": round(settings.batch_size / seconds, 2),
            "peak_rss_mb": peak_rss_mb(),
        }
        self.history.append(record)
        self.log.write(record)
        if on_step is not None and self.main:
            on_step(step, StepLosses(*(torch.tensor(value) for value in mean)))
