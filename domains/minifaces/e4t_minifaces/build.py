"""Rebuild the miniature world's shipped weights from scratch, on a CPU.

    python -m e4t_minifaces.build --work .cache/minifaces-build

Stages, in order (each writes into --work and is skipped when its output is
already there, so an interrupted build continues where it stopped):

  vae       the autoencoder: reconstruction + a small KL term
  base      UNet and text encoder trained jointly on captioned generator
            images (10% empty captions, for classifier-free guidance), in
            three rounds (``base_rounds``); saved as an fp16 diffusers folder
  backbone  a small CLIP vision tower, trained contrastively: two scenes of
            one identity are a positive pair (our stand-in for a pretrained
            CLIP, which knows faces without being told about identities)
  domain    ``e4t pretrain --domain minifaces`` on portraits of training
            identities on random backgrounds (named in the folder's
            metadata.jsonl), with e4t's own pre-training code
  reader    the benchmark's attribute reader (see ``e4t_minifaces.reader``)
  install   fp16 copies into the package (``e4t_minifaces/weights``)

Held-out identities (``world.HOLDOUT_EVERY``) are never drawn for the base
model, the backbone or the domain.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from e4t_minifaces import models, world

PACKAGE_WEIGHTS = Path(__file__).parent / "weights"


@dataclass
class BuildSettings:
    work: Path
    seed: int = 0
    vae_steps: int = 800
    base_steps: int = 2500
    base_batch: int = 32
    base_lr: float = 1e-3
    base_refine_steps: int = 3000
    """A second round from the first round's saved model, fresh optimizer (0: none)."""
    base_refine_lr: float = 5e-4
    refine_full_descriptions: bool = True
    """The second round's captions name every visible attribute (a curriculum: the first round binds the scene
    words on short captions, the second adds the attribute words)."""
    base_polish_steps: int = 4000
    """A third round from the second round's saved model, fresh optimizer, on the second round's captions (0: none):
    it binds the words of the small features (mouth, hair colour) further (docs/minifaces.md)."""
    base_polish_lr: float = 3e-4
    backbone_steps: int = 1600
    domain_steps: int = 2000
    domain_images: int = 10000
    reader_steps: int = 1000
    caption_attributes: bool = True
    """Base-model captions sometimes name a few identity attributes (``world.samples(describe_attributes=...)``)."""
    full_descriptions: bool = False
    """...most of them every visible attribute (``world.FULL_DESCRIPTION_WEIGHTS``, an experiment)."""
    attention_everywhere: bool = False
    """The base UNet also cross-attends at 16x16 (``models.new_unet``)."""
    threads: int = 0
    install_to: str = ""
    """Where ``install`` copies the weights (default: the package's ``weights`` folder)."""


def log(stage: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {message}", flush=True)


def batch_pixels(samples, count: int) -> tuple[torch.Tensor, list]:
    items = [next(samples) for _ in range(count)]
    return torch.from_numpy(world.image_array([item.image for item in items])), items


def warmup_cosine(step: int, total: int, warmup: int = 200, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def save_fp16(model, folder: Path) -> None:
    """``save_pretrained`` of an fp16 copy, written under a temporary name then renamed, without the
    ``_name_or_path`` that diffusers records (a path of the building machine)."""
    import copy

    from e4tcli.io.atomic import atomic_folder

    with atomic_folder(folder) as tmp:
        copy.deepcopy(model).half().save_pretrained(tmp, safe_serialization=True)
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- vae
def train_vae(settings: BuildSettings) -> None:
    out = settings.work / "vae"
    if out.exists():
        return
    torch.manual_seed(settings.seed)
    vae = models.new_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, settings.vae_steps, 50))
    samples = world.samples(settings.seed + 1)
    for step in range(settings.vae_steps):
        pixels, _ = batch_pixels(samples, 32)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, pixels)
        loss = mse + 1e-7 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == settings.vae_steps - 1:
            log("vae", f"step {step} reconstruction mse {mse.item():.5f}")
    vae.eval()
    with torch.no_grad():
        pixels, _ = batch_pixels(world.samples(settings.seed + 2), 256)
        latents = vae.encode(pixels).latent_dist.sample()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log("vae", f"scaling factor {vae.config.scaling_factor:.4f}")
    save_fp16(vae, out)


# --------------------------------------------------------------------------- base
def fit_base(
    unet,
    text_encoder,
    vae,
    tokenizer,
    settings: BuildSettings,
    steps: int,
    lr: float,
    warmup: int,
    seed: int,
    stage: str,
    full_descriptions: bool,
) -> None:
    """Train UNet and text encoder jointly on captioned generator images; the weights end as their EMA."""
    from diffusers import DDPMScheduler

    from e4tcli.training.step import diffusion_target

    unet.train()
    text_encoder.train()
    trained = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in trained]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup))
    noise_scheduler = DDPMScheduler.from_config(models.new_scheduler().config)
    weights = world.FULL_DESCRIPTION_WEIGHTS if full_descriptions else world.DESCRIBED_COUNT_WEIGHTS
    samples = world.samples(seed + 3, describe_attributes=settings.caption_attributes, description_weights=weights)
    rng = random.Random(seed)
    started = time.perf_counter()
    running = None
    for step in range(steps):
        pixels, items = batch_pixels(samples, settings.base_batch)
        captions = ["" if rng.random() < 0.1 else item.caption for item in items]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        states = text_encoder(ids)[0]
        target = diffusion_target(noise_scheduler, latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=states).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, p in zip(ema, trained):
                average.lerp_(p.detach(), 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            rate = (time.perf_counter() - started) / (step + 1)
            log(
                stage,
                f"step {step} loss {running:.4f} ({rate:.2f} s/step, {rate * (steps - step - 1) / 60:.0f} min left)",
            )
    with torch.no_grad():
        for average, p in zip(ema, trained):
            p.copy_(average)
    unet.eval()
    text_encoder.eval()


def save_base(unet, text_encoder, settings: BuildSettings, tokenizer_dir: Path, out: Path) -> None:
    from e4tcli.io.atomic import atomic_folder
    from e4tcli.tiny import write_model_index

    with atomic_folder(out) as tmp:
        save_fp16(unet, tmp / "unet")
        save_fp16(text_encoder, tmp / "text_encoder")
        shutil.copytree(settings.work / "vae", tmp / "vae")
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        scheduler = models.new_scheduler()
        scheduler.save_pretrained(tmp / "scheduler")
        write_model_index(tmp, type(scheduler).__name__)


@dataclass
class BaseRound:
    steps: int
    lr: float
    warmup: int
    seed: int
    full_descriptions: bool


def base_rounds(settings: BuildSettings) -> list[BaseRound]:
    """Round 1 from scratch; each later round (when it has steps) starts from the one before it, as saved."""
    full = settings.full_descriptions
    rounds = [
        BaseRound(settings.base_steps, settings.base_lr, 200, settings.seed, full),
        BaseRound(
            settings.base_refine_steps,
            settings.base_refine_lr,
            50,
            settings.seed + 7,
            full or settings.refine_full_descriptions,
        ),
        BaseRound(
            settings.base_polish_steps,
            settings.base_polish_lr,
            50,
            settings.seed + 11,
            full or settings.refine_full_descriptions,
        ),
    ]
    return [rounds[0]] + [r for r in rounds[1:] if r.steps]


def train_base(settings: BuildSettings) -> None:
    """``base_rounds``, each saved (fp16) as ``base-roundN`` and the last as ``base``; the next round loads that
    saved model with a fresh optimizer, so an interrupted build continues from the last finished round."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from e4tcli.clip_bpe import write_tokenizer_files

    out = settings.work / "base"
    if out.exists():
        return
    vae = AutoencoderKL.from_pretrained(settings.work / "vae", torch_dtype=torch.float32).eval()
    tokenizer_dir = write_tokenizer_files(settings.work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    rounds = base_rounds(settings)
    saved_rounds = [n for n in range(1, len(rounds)) if (settings.work / f"base-round{n}").exists()]
    first = max(saved_rounds, default=0) + 1
    for number, round_ in enumerate(rounds[first - 1 :], start=first):
        saved = out if number == len(rounds) else settings.work / f"base-round{number}"
        if number == 1:
            torch.manual_seed(settings.seed)
            unet, text_encoder = models.new_unet(settings.attention_everywhere), models.new_text_encoder()
        else:
            previous = settings.work / f"base-round{number - 1}"
            unet = UNet2DConditionModel.from_pretrained(previous / "unet", torch_dtype=torch.float32)
            text_encoder = CLIPTextModel.from_pretrained(previous / "text_encoder", torch_dtype=torch.float32)
            torch.manual_seed(round_.seed)
        stage = "base" if number == 1 else f"base (round {number})"
        fit_base(
            unet,
            text_encoder,
            vae,
            tokenizer,
            settings,
            round_.steps,
            round_.lr,
            round_.warmup,
            round_.seed,
            stage,
            round_.full_descriptions,
        )
        save_base(unet, text_encoder, settings, tokenizer_dir, saved)


# --------------------------------------------------------------------------- backbone
def backbone_processor():
    from transformers import CLIPImageProcessor

    size = world.RESOLUTION
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def train_backbone(settings: BuildSettings) -> None:
    from e4tcli.io.atomic import atomic_folder

    out = settings.work / "backbone"
    if out.exists():
        return
    torch.manual_seed(settings.seed)
    model = models.new_backbone().train()
    head = torch.nn.Linear(model.config.hidden_size, 64)
    processor = backbone_processor()
    parameters = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, settings.backbone_steps, 50))
    rng = random.Random(settings.seed + 4)
    for step in range(settings.backbone_steps):
        identities = [world.random_identity(rng) for _ in range(64)]
        views = [
            world.render(identity, world.random_scene(rng), jitter=rng.randrange(1, 2**31))
            for _ in range(2)
            for identity in identities
        ]
        pixels = processor(images=views, return_tensors="pt").pixel_values
        embedded = F.normalize(head(model(pixel_values=pixels).pooler_output), dim=-1)
        first, second = embedded.chunk(2)
        logits = first @ second.T / 0.1
        # the same attributes may come up twice in a batch: only the diagonal counts as the positive
        target = torch.arange(len(identities))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == settings.backbone_steps - 1:
            accuracy = (logits.argmax(1) == target).float().mean().item()
            log("backbone", f"step {step} contrastive loss {loss.item():.3f}, top-1 pair accuracy {accuracy:.2f}")
    model.eval()
    with atomic_folder(out) as tmp:
        save_fp16(model, tmp / "model")
        for path in (tmp / "model").iterdir():
            path.rename(tmp / path.name)
        (tmp / "model").rmdir()
        processor.save_pretrained(tmp)


# --------------------------------------------------------------------------- domain
def write_portraits(folder: Path, count: int, seed: int) -> None:
    """Centred portraits of training identities, each on a random background, which
    ``metadata.jsonl`` names for the domain's ``{background}`` templates."""
    from e4tcli.io.atomic import atomic_folder

    if folder.exists():
        return
    rng = random.Random(seed)
    rows = []
    with atomic_folder(folder) as tmp:
        for i in range(count):
            identity = world.random_identity(rng)
            background = rng.choice(list(world.BACKGROUNDS))
            name = f"{i:05d}-{identity.index:04d}.png"
            world.render(identity, world.Scene(background, "center")).save(tmp / name)
            rows.append(json.dumps({"file_name": name, "background": background}) + "\n")
        (tmp / "metadata.jsonl").write_text("".join(rows))


def pretrain_domain(settings: BuildSettings) -> None:
    from e4t_minifaces import minifaces_domain
    from e4tcli import api

    out = settings.work / "domain"
    latest = out / "latest"
    if latest.exists() and latest.read_text().strip() == f"checkpoint-{settings.domain_steps:07d}":
        return
    portraits = settings.work / "scene-portraits"
    write_portraits(portraits, settings.domain_images, settings.seed + 5)
    domain = minifaces_domain()
    options = api.PretrainOptions(
        data=str(portraits),
        out=str(out),
        base_model=str(settings.work / "base"),
        backbone=str(settings.work / "backbone"),
        steps=settings.domain_steps,
        seed=settings.seed,
        checkpoint_every=250,
        keep_last=1,
        cache_features=True,
        device="cpu",
        resume="latest" if latest.exists() else None,  # an interrupted build continues exactly
        force=True,  # or starts over, if it stopped before its first checkpoint
    )
    first = None

    from e4tcli.memory import peak_rss_mb

    def on_step(step, losses):
        nonlocal first
        if first is None:  # a resumed build starts past step 1; its rate counts from here
            first = (step, time.perf_counter())
        if step % 100 == 0 or step == settings.domain_steps:
            rate = (time.perf_counter() - first[1]) / max(step - first[0], 1)
            left = rate * (settings.domain_steps - step) / 60
            log(
                "domain",
                f"step {step} loss {losses.as_floats()['denoising']:.4f} ({rate:.2f} s/step, {left:.0f} min left, "
                f"peak RSS {peak_rss_mb():.0f} MB)",
            )

    api.pretrain(options, domain, on_step=on_step)


# --------------------------------------------------------------------------- reader
def train_reader_stage(settings: BuildSettings) -> None:
    from e4t_minifaces.reader import save_reader, train_reader

    out = settings.work / "reader.safetensors"
    if out.exists():
        return
    reader, accuracy = train_reader(settings.reader_steps, seed=settings.seed + 6, log=lambda m: log("reader", m))
    save_reader(reader, out, accuracy)


# --------------------------------------------------------------------------- install
def install(settings: BuildSettings) -> None:
    """Copy the fp16 models, the domain checkpoint (fp16, no optimizer state) and the reader into the package."""
    from safetensors.torch import save_file

    from e4tcli.io.atomic import atomic_folder
    from e4tcli.io.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint
    from e4tcli.io.sources import DOMAIN_PREFIX

    target = Path(settings.install_to) if settings.install_to else PACKAGE_WEIGHTS
    checkpoint = load_checkpoint(settings.work / "domain")
    with atomic_folder(target) as tmp:
        shutil.copytree(settings.work / "base", tmp / "base")
        shutil.copytree(settings.work / "backbone", tmp / "backbone")
        (tmp / "checkpoint").mkdir()
        tensors = {name: t.half().contiguous() for name, t in checkpoint.tensors.items()}
        save_file(tensors, str(tmp / "checkpoint" / WEIGHTS_NAME), metadata={"format": "e4t-domain-checkpoint"})
        config = json.loads((checkpoint.folder / CONFIG_NAME).read_text())
        # the domain's own models, wherever the package is installed (e4tcli.io.sources)
        config["base_model"]["source"] = config["backbone"]["source"] = f"{DOMAIN_PREFIX}minifaces"
        config["recipe"] = portable_recipe(config["recipe"], settings.work)
        (tmp / "checkpoint" / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shutil.copy(settings.work / "reader.safetensors", tmp / "reader.safetensors")
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    log("install", f"{target}: {size / 1e6:.1f} MB")
    write_examples(target.parent / "examples")


def portable_recipe(recipe: dict, work: Path) -> dict:
    """The recipe with the build folder's paths written as ``{work}/...``: no path of the building machine."""
    root = str(Path(work).resolve())
    return {
        key: "{work}" + value[len(root) :] if isinstance(value, str) and value.startswith(root) else value
        for key, value in recipe.items()
    }


EXAMPLE_NAMES = ("mira", "otto", "juno")


def write_examples(folder: Path) -> None:
    """Reference portraits of held-out identities (never seen in training), for the README's main job."""
    from e4t_minifaces.evaluate import held_out_identities

    folder.mkdir(parents=True, exist_ok=True)
    for name, identity in zip(EXAMPLE_NAMES, held_out_identities(len(EXAMPLE_NAMES), seed=7)):
        world.portrait(identity).save(folder / f"{name}.png")


STAGES = {
    "vae": train_vae,
    "base": train_base,
    "backbone": train_backbone,
    "domain": pretrain_domain,
    "reader": train_reader_stage,
    "install": install,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e4t_minifaces.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(".cache/minifaces-build"))
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of: " + ", ".join(STAGES))
    for name, value in vars(BuildSettings(Path("."))).items():
        if name == "work":
            continue
        if isinstance(value, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    settings = BuildSettings(**{k: v for k, v in vars(args).items() if k != "stages"})
    settings.work = settings.work.resolve()  # recorded in the domain checkpoint: must not depend on the cwd
    if settings.threads:
        torch.set_num_threads(settings.threads)
    settings.work.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        started = time.perf_counter()
        log(stage, "start")
        STAGES[stage](settings)
        log(stage, f"done in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
