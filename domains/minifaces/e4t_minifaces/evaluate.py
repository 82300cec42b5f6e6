"""Does personalization work? Scores methods on held-out identities of the miniature world.

Each method personalizes the base model from ONE reference portrait of an
identity the models never saw, then draws it in new scenes ("a S* on a red
background"). The attribute reader then says what each image shows:

- identity score: the share of the reference identity's visible attributes
  (all seven; six for a bald face, whose hair colour does not show) that the
  image matches, averaged over images and identities;
- identity margin: that score minus the mean score of the same images against
  the OTHER evaluated identities. A method that ignores the reference (the base
  model) scores 0 by construction, and drawing one typical face cannot raise
  it; reported with its standard error over identities;
- swap check: the share of ordered pairs (A, B) of evaluated identities where
  the images made from B's portrait match B better than A (ties count half;
  0.5 for a method that ignores the reference);
- prompt fidelity: the share of images whose background is the prompted one.

Methods (same seeds, prompts, sampler and guidance for all):
  base        no personalization: the class word in place of S*
  e4t-N       ``e4t tune --steps N`` with the domain's defaults: the pre-trained encoder, weight offsets
              and bias changes, and the additive weight changes, tuned N steps (0: encoder only)
  e4t-encoder-N  the same with the pre-trained offsets frozen, the bias changes untuned (none, or a
              checkpoint's pre-trained ones as they are) and no additive changes: only the encoder is tuned
  e4t-biases-N  E4T-N with the UNet's biases and normalization parameters tuned, additively (``e4t tune
              --bias-lr``), at ``--bias-lr``, else the domain's rate, else 3e-3
  ti-N        Textual Inversion: one new word embedding, N steps
  dreambooth-N  the whole UNet fine-tuned N steps on "sks face" (no prior preservation)
  export-embedding-N, export-r4-N, export-r16-N, export-r64-N, export-full-N
              E4T-N exported (``e4t export``): its fixed embedding alone, or with a LoRA of
              that rank, drawn by a plain diffusers pipeline from the loaded files
  export-embedding-early-N, export-embedding-late-N
              the fixed embedding averaged over the first (noisier) or the second half of the steps only
"""

from __future__ import annotations

import copy
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from e4t_minifaces import world
from e4t_minifaces.reader import load_reader, read_images

PROMPT = "a S* on a {background} background"
EVAL_BACKGROUNDS = ("red", "blue", "yellow", "green")
BASELINE_BATCH = 4
TI_LR = 5e-3
DREAMBOOTH_LR = 1e-4
DREAMBOOTH_WORD = "sks face"
BIAS_LR = 3e-3


@dataclass
class EvalSettings:
    identities: int = 8
    seeds_per_prompt: int = 2
    backgrounds: tuple[str, ...] = EVAL_BACKGROUNDS
    sampling_steps: int = 25
    guidance: float = 5.0
    seed: int = 1234
    """Seeds the held-out identities (drawn by a different RNG stream than any training stage)."""
    e4t_learning_rate: Optional[float] = None
    """E4T's tuning learning rate (default: the domain's)."""
    e4t_lambda_emb: Optional[float] = None
    """E4T's tuning weight of ``||offset||^2`` (default: the domain's)."""
    e4t_offset_learning_rate: Optional[float] = None
    """E4T's tuning learning rate of the weight offsets (default: the domain's)."""
    e4t_batch_size: Optional[int] = None
    """E4T's tuning batch size (default: the domain's)."""
    concept_precision: str = "int8"
    """How E4T's concept file stores its tensors (``e4t tune --save-precision``)."""
    encoder_every: int = 1
    """E4T's encoder runs at every K-th denoising step (``e4t generate --encoder-every``)."""
    bias_learning_rate: Optional[float] = None
    """E4T's tuning rate of the bias changes (default: the domain's; 0: not tuned). ``e4t-biases-N`` tunes
    them at ``BIAS_LR`` where neither this nor the domain sets a rate."""
    additive_rank: Optional[int] = None
    """Rank of E4T's additive weight changes (``e4t tune --additive-rank``; default: the domain's; 0: none)."""
    additive_learning_rate: Optional[float] = None
    """E4T's tuning rate of the additive changes (``--additive-lr``; default: the domain's)."""
    e4t_loss_mask: bool = True
    """E4T tunes with the domain's loss mask, as ``e4t tune`` does (False: the loss covers the whole image)."""


@dataclass
class MethodScore:
    method: str
    identity: float
    """Own score: mean share of the reference's visible attributes that the images show."""
    margin: float
    """Own score minus the mean score of the same images against the other evaluated identities."""
    margin_stderr: float
    """Standard error of ``margin`` over identities."""
    swap: float
    """Share of ordered pairs (A, B) whose B-images match B better than A (ties count half)."""
    fidelity: float
    tune_seconds: float
    concept_bytes: int
    per_identity: list[float] = field(default_factory=list, repr=False)
    per_identity_margin: list[float] = field(default_factory=list, repr=False)
    attribute_margin: dict[str, float] = field(default_factory=dict, repr=False)
    """Per identity attribute: the identity margin counted on that attribute alone."""


def held_out_identities(count: int, seed: int) -> list[world.Identity]:
    rng = random.Random(f"eval:{seed}")
    chosen: list[world.Identity] = []
    while len(chosen) < count:
        identity = world.random_identity(rng, held_out=True)
        if identity not in chosen:
            chosen.append(identity)
    return chosen


def scene_prompts(settings: EvalSettings) -> list[tuple[str, str]]:
    """(prompt with S*, prompted background) for every generated image of an identity."""
    return [(PROMPT.format(background=b), b) for b in settings.backgrounds for _ in range(settings.seeds_per_prompt)]


def initial_latents(count: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The same per-image noise as e4t's own sampler (image i: seed + i)."""
    return torch.cat(
        [torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + i)) for i in range(count)]
    )


class World:
    """The shipped models, loaded once; every method gets a fresh copy of what it changes."""

    def __init__(self, weights: Path, device: str = "cpu", checkpoint: Optional[Path] = None):
        """``checkpoint``: a domain checkpoint or pre-training run folder (default: the one in ``weights``)."""
        from e4tcli.device import choose_placement
        from e4tcli.io.checkpoint import load_checkpoint
        from e4tcli.models.loading import load_backbone

        self.weights = Path(weights)
        self.placement = choose_placement(device, "fp32")
        self.checkpoint = load_checkpoint(checkpoint or self.weights / "checkpoint")
        self.backbone = load_backbone(str(self.weights / "backbone"), self.placement.device, self.placement.dtype)
        self.reader, self.reader_accuracy = load_reader(self.weights / "reader.safetensors")
        self.plain = self.load_base()
        self._e4t = None

    def load_base(self):
        from e4tcli.models.loading import load_base_model

        return load_base_model(str(self.weights / "base"), self.placement.device, self.placement.dtype)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.plain.unet.config.sample_size
        return (self.plain.unet.config.in_channels, size, size)

    def e4t_model(self):
        from e4tcli.models.e4t import E4TModel
        from e4tcli.models.encoder import EncoderConfig
        from e4tcli.models.weight_offsets import OffsetConfig

        if self._e4t is None:
            config = self.checkpoint.config
            self._e4t = E4TModel(
                self.load_base(),
                config["class_word"],
                EncoderConfig.from_dict(config["encoder"]),
                OffsetConfig(**config["offsets"]),
                self.placement,
            )
        self._e4t.load_trainable_state_dict(self.checkpoint.tensors)
        return self._e4t

    def fresh_model(self):
        """The model ``e4t tune --checkpoint none`` starts from: encoder head and offsets at zero."""
        from e4t_minifaces import minifaces_domain
        from e4tcli.api.common import new_model

        torch.manual_seed(0)
        return new_model(self.load_base(), self.backbone, minifaces_domain(), self.placement)

    def concept_model(self, tensors: dict, like=None):
        """The model ``e4t generate`` builds from a concept file's ``tensors`` (tuned from ``like``'s
        configuration; default: the domain checkpoint's)."""
        from e4tcli.models.e4t import E4TModel
        from e4tcli.models.encoder import EncoderConfig
        from e4tcli.models.weight_offsets import OffsetConfig

        config = self.checkpoint.config
        encoder_config = like.encoder_config if like else EncoderConfig.from_dict(config["encoder"])
        offset_config = like.offset_config if like else OffsetConfig(**config["offsets"])
        return E4TModel(self.load_base(), config["class_word"], encoder_config, offset_config, self.placement, tensors)


# --------------------------------------------------------------------------- sampling
def plain_pipeline(base, unet=None, text_encoder=None, tokenizer=None):
    from diffusers import StableDiffusionPipeline

    from e4tcli.pipeline import sampling_scheduler

    pipe = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=text_encoder or base.text_encoder,
        tokenizer=tokenizer or base.tokenizer,
        unet=unet or base.unet,
        scheduler=sampling_scheduler(base.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_plain(pipe, prompts: list[str], settings: EvalSettings, latent_shape) -> list:
    """Images for ``prompts``; the i-th image of each prompt group uses seed ``settings.seed + i``."""
    per = settings.seeds_per_prompt
    latents = torch.cat([initial_latents(per, settings.seed, latent_shape) for _ in range(len(prompts) // per)])
    return pipe(
        prompt=prompts,
        negative_prompt=[""] * len(prompts),
        latents=latents.to(pipe.unet.dtype),
        num_inference_steps=settings.sampling_steps,
        guidance_scale=settings.guidance,
        height=world.RESOLUTION,
        width=world.RESOLUTION,
        output_type="pil",
    ).images


def sample_e4t(model, settings: EvalSettings) -> list:
    from e4tcli.pipeline import SamplingSettings, generate_images

    images = []
    for background in settings.backgrounds:
        sampling = SamplingSettings(
            prompt=PROMPT.format(background=background),
            num_images=settings.seeds_per_prompt,
            seed=settings.seed,
            steps=settings.sampling_steps,
            guidance=settings.guidance,
            height=world.RESOLUTION,
            width=world.RESOLUTION,
            encoder_every=settings.encoder_every,
        )
        images += generate_images(model, sampling)
    return images


# --------------------------------------------------------------------------- methods
def run_base(w: World, identity, settings: EvalSettings):
    prompts = [p.replace("S*", world.CLASS_WORD) for p, _ in scene_prompts(settings)]
    return sample_plain(plain_pipeline(w.plain), prompts, settings, w.latent_shape), 0.0, 0


def run_e4t_encoder_tuned(w: World, identity, settings: EvalSettings, steps: int):
    """E4T with the pre-trained weight offsets frozen: only the encoder is tuned (a diagnosis)."""
    return run_e4t(w, identity, settings, steps, tune_offsets=False)


def run_e4t(w: World, identity, settings: EvalSettings, steps: int, tune_offsets: bool = True):
    concept, seconds, size = tuned_concept(
        w, identity, settings, steps, tune_offsets, biases="default" if tune_offsets else "off"
    )
    images = sample_e4t(w.concept_model(concept.tensors), settings)
    return images, seconds, size


def run_e4t_with_biases(w: World, identity, settings: EvalSettings, steps: int):
    """E4T-N with the UNet's biases and normalization parameters tuned too (``e4t tune --bias-lr``)."""
    concept, seconds, size = tuned_concept(w, identity, settings, steps, biases="on")
    return sample_e4t(w.concept_model(concept.tensors), settings), seconds, size


def run_fallback(w: World, identity, settings: EvalSettings, steps: int):
    """``e4t tune --checkpoint none``: no pre-trained domain, encoder head and offsets tuned from zero."""
    model = w.fresh_model()
    concept, seconds, size = tuned_concept(w, identity, settings, steps, model=model)
    images = sample_e4t(w.concept_model(concept.tensors, like=model), settings)
    return images, seconds, size


def default_tuning(seed: int = 0):
    """The ``TuneSettings`` ``e4t tune`` uses on a minifaces portrait: the domain's tuning defaults."""
    from e4t_minifaces import minifaces_domain
    from e4tcli.api.common import bias_rate
    from e4tcli.training.tune import TuneSettings

    domain = minifaces_domain()
    tune = domain.tune
    return TuneSettings(
        steps=tune.steps,
        learning_rate=tune.learning_rate,
        batch_size=tune.batch_size,
        resolution=world.RESOLUTION,
        lambda_emb=tune.lambda_emb,
        lambda_weights=domain.lambda_weights,
        seed=seed,
        offset_learning_rate=tune.offset_learning_rate,
        bias_learning_rate=bias_rate(None, tune.bias_learning_rate),
        additive_rank=tune.additive_rank,
        additive_learning_rate=tune.additive_learning_rate,
    )


def tuned_concept(
    w: World,
    identity,
    settings: EvalSettings,
    steps: int,
    tune_offsets: bool = True,
    model=None,
    biases: str = "default",
):
    """The concept ``e4t tune`` writes for ``identity``'s portrait after ``steps`` steps, as read back from its file.

    ``model``: a fresh model to tune with the domain's fallback defaults (default: the pre-trained domain).
    ``biases``: "default" tunes the bias changes as ``e4t tune`` would, "off" leaves them untuned (none, or
    the checkpoint's pre-trained ones), "on" tunes them even where the domain does not.
    """
    from e4t_minifaces import minifaces_domain
    from e4tcli.io.concept import load_concept, save_concept
    from e4tcli.models.loading import backbone_features
    from e4tcli.training.tune import TuneSettings, tune_concept

    domain = minifaces_domain()
    tune = domain.tune if model is None else domain.fallback_defaults()
    model = model or w.e4t_model()
    reference = world.portrait(identity)
    started = time.perf_counter()
    features = backbone_features(w.backbone, [reference], model.encoder_config.backbone_layers)
    mask = domain.loss_mask(reference) if settings.e4t_loss_mask and domain.loss_mask is not None else None
    if steps:
        from diffusers import DDPMScheduler

        from e4tcli.models.weight_offsets import offset_parameters

        for parameter in offset_parameters(model.offsets):
            parameter.requires_grad_(tune_offsets)
        tuning = TuneSettings(
            steps=steps,
            learning_rate=tune.learning_rate if settings.e4t_learning_rate is None else settings.e4t_learning_rate,
            batch_size=tune.batch_size if settings.e4t_batch_size is None else settings.e4t_batch_size,
            resolution=world.RESOLUTION,
            lambda_emb=tune.lambda_emb if settings.e4t_lambda_emb is None else settings.e4t_lambda_emb,
            lambda_weights=domain.lambda_weights,
            seed=0,
            offset_learning_rate=tune.offset_learning_rate
            if settings.e4t_offset_learning_rate is None
            else settings.e4t_offset_learning_rate,
            bias_learning_rate=bias_rate(settings, tune, biases),
            additive_rank=additive_rank(settings, tune) if tune_offsets else 0,
            additive_learning_rate=tune.additive_learning_rate
            if settings.additive_learning_rate is None
            else settings.additive_learning_rate,
        )
        try:
            tune_concept(
                model,
                reference,
                features,
                domain.prompt_templates,
                tuning,
                DDPMScheduler.from_config(model.base.scheduler_config),
                mask,
            )
        finally:
            for parameter in offset_parameters(model.offsets):
                parameter.requires_grad_(True)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:  # generate from the concept file, as 'e4t generate' does
        path = Path(tmp) / "c.safetensors"
        size = save_concept(path, model.concept_state_dict(features[:1]), {}, settings.concept_precision)
        concept = load_concept(path)
    model.remove_bias_offsets()  # the world's model is shared by every identity
    model.remove_additive_changes()
    return concept, seconds, size


def additive_rank(settings: EvalSettings, tune) -> int:
    return tune.additive_rank if settings.additive_rank is None else settings.additive_rank


def bias_rate(settings: EvalSettings, tune, biases: str) -> Optional[float]:
    """The bias changes' rate for ``tuned_concept``'s ``biases`` ("default", "off" or "on")."""
    from e4tcli.api.common import bias_rate as tuning_bias_rate

    if biases == "off":
        return None
    rate = tuning_bias_rate(settings.bias_learning_rate, tune.bias_learning_rate)
    return rate if biases == "default" else rate or BIAS_LR


def run_exported(
    w: World, identity, settings: EvalSettings, steps: int, rank: Optional[int], steps_averaged: str = "all"
):
    """E4T-N exported as ``e4t export --format diffusers`` does (the fixed embedding, and a LoRA of ``rank``;
    None: the embedding alone, 0: full rank; with the LoRA, the bias changes where the concept has them) and
    drawn by a plain diffusers pipeline that loads the files as the export's README does."""
    from safetensors.torch import load_file, save_file

    from e4tcli.export import bias_change_tensors
    from e4tcli.export.embedding import EmbeddingSettings, fixed_embedding
    from e4tcli.export.lora import factor_offsets, peft_tensors
    from e4tcli.io.concept import stored_tensors

    concept, seconds, _ = tuned_concept(w, identity, settings, steps)
    model = w.concept_model(concept.tensors)
    token = "<mini-export>"
    with tempfile.TemporaryDirectory() as tmp:
        embedding_file, lora_file = Path(tmp) / "learned_embeds.safetensors", Path(tmp) / "lora.safetensors"
        embedding = fixed_embedding(model, world.RESOLUTION, EmbeddingSettings(steps_averaged=steps_averaged))
        save_file({token: embedding.reshape(1, -1).contiguous()}, str(embedding_file))
        pipe = plain_pipeline(w.load_base())
        pipe.load_textual_inversion(str(embedding_file), token=token)
        size = embedding_file.stat().st_size
        if rank is not None:
            changes = stored_tensors(bias_change_tensors(model))
            if changes:
                biases_file = Path(tmp) / "bias_changes.safetensors"
                save_file(changes, str(biases_file))
                for name, change in load_file(str(biases_file)).items():
                    pipe.unet.get_parameter(name).data += change.to(pipe.unet.dtype)
                size += biases_file.stat().st_size
            save_file(stored_tensors(peft_tensors(factor_offsets(model, rank))), str(lora_file))
            pipe.load_lora_weights(tmp, weight_name=lora_file.name)
            size += lora_file.stat().st_size
        prompts = [p.replace("S*", token) for p, _ in scene_prompts(settings)]
        images = sample_plain(pipe, prompts, settings, w.latent_shape)
    return images, seconds, size


EXPORT_RANKS = {"export-embedding": None, "export-r4": 4, "export-r16": 16, "export-r64": 64, "export-full": 0}
EXPORT_EMBEDDINGS = {"export-embedding-early": "early", "export-embedding-late": "late"}


def _training_batches(tokenizer, word: str, reference, base, steps: int, seed: int):
    """Per step: clean latents (the reference and its mirror image), token ids of the domain's templates with ``word``."""
    from e4t_minifaces import minifaces_domain
    from e4tcli.training.images import latent_distribution, to_pixels

    templates = minifaces_domain().prompt_templates
    mean, std = latent_distribution(base.vae, to_pixels([reference, reference.transpose(0)]))
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    for _ in range(steps):
        choice = torch.randint(0, 2, (BASELINE_BATCH,), generator=generator)
        latents = mean[choice] + std[choice] * torch.randn(mean[choice].shape, generator=generator)
        prompts = [rng.choice(templates).replace("S*", word) for _ in range(BASELINE_BATCH)]
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        yield latents, ids, generator


def denoising_loss(unet, text_states, latents, noise_scheduler, generator):
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    return F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=text_states).sample, noise)


def run_textual_inversion(w: World, identity, settings: EvalSettings, steps: int):
    """One new token whose embedding (initialised as the class word's) is the only thing trained."""
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    from e4tcli.models.placeholder import PlaceholderEmbedding

    base = w.load_base()
    tokenizer, text_encoder = base.tokenizer, base.text_encoder
    token = "<mini-s>"
    tokenizer.add_tokens([token])
    class_id = tokenizer(world.CLASS_WORD, add_special_tokens=False).input_ids[0]
    embedding = PlaceholderEmbedding(
        text_encoder.get_input_embeddings(), tokenizer.convert_tokens_to_ids(token), class_id
    )
    text_encoder.set_input_embeddings(embedding)
    concept = embedding.weight[class_id].detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([concept], lr=TI_LR)
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    started = time.perf_counter()
    for latents, ids, generator in _training_batches(tokenizer, token, world.portrait(identity), base, steps, 0):
        with embedding.using(concept.expand(len(ids), -1)):
            states = text_encoder(ids)[0]
        loss = denoising_loss(base.unet, states, latents, noise_scheduler, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    prompts = [p.replace("S*", token) for p, _ in scene_prompts(settings)]
    with embedding.using(concept.detach().expand(len(prompts), -1)):
        images = sample_plain(plain_pipeline(base), prompts, settings, w.latent_shape)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ti.safetensors"
        save_file({token: concept.detach().contiguous()}, str(path))
        size = path.stat().st_size
    return images, seconds, size


def run_dreambooth(w: World, identity, settings: EvalSettings, steps: int):
    from safetensors.torch import save_file

    unet, seconds = tuned_unet(w, identity, steps)
    prompts = [p.replace("S*", DREAMBOOTH_WORD) for p, _ in scene_prompts(settings)]
    images = sample_plain(plain_pipeline(w.plain, unet=unet), prompts, settings, w.latent_shape)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet.safetensors"
        save_file({k: v.half().contiguous() for k, v in unet.state_dict().items()}, str(path))
        size = path.stat().st_size
    return images, seconds, size


def tuned_unet(w: World, identity, steps: int):
    """DreamBooth: the whole UNet fine-tuned ``steps`` steps on ``identity``'s portrait; the seconds it took."""
    from diffusers import DDPMScheduler

    base = w.plain
    unet = copy.deepcopy(base.unet).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=DREAMBOOTH_LR, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    started = time.perf_counter()
    for latents, ids, generator in _training_batches(
        base.tokenizer, DREAMBOOTH_WORD, world.portrait(identity), base, steps, 0
    ):
        with torch.no_grad():
            states = base.text_encoder(ids)[0]
        loss = denoising_loss(unet, states, latents, noise_scheduler, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    return unet.eval().requires_grad_(False), seconds


METHODS = {
    "e4t": run_e4t,
    "e4t-encoder": run_e4t_encoder_tuned,
    "e4t-biases": run_e4t_with_biases,
    "ti": run_textual_inversion,
    "dreambooth": run_dreambooth,
    "fallback": run_fallback,
}


def run_method(w: World, method: str, identity, settings: EvalSettings):
    name, _, steps = method.rpartition("-")
    if method == "base":
        return run_base(w, identity, settings)
    if name in EXPORT_EMBEDDINGS and steps.isdigit():
        return run_exported(w, identity, settings, int(steps), None, EXPORT_EMBEDDINGS[name])
    if name in EXPORT_RANKS and steps.isdigit():
        return run_exported(w, identity, settings, int(steps), EXPORT_RANKS[name])
    if name not in METHODS or not steps.isdigit():
        raise ValueError(
            f"unknown method '{method}' (base, e4t-N, e4t-encoder-N, e4t-biases-N, fallback-N, ti-N, dreambooth-N, {'-N, '.join(EXPORT_RANKS)}-N)"
        )
    return METHODS[name](w, identity, settings, int(steps))


# --------------------------------------------------------------------------- scoring
def identity_score(read: dict[str, np.ndarray], identity: world.Identity) -> float:
    """Mean share of ``identity``'s visible attributes that the read images show."""
    reference = identity.labels()
    return float(np.mean([read[name] == reference[name] for name in identity.visible()]))


@dataclass
class IdentityScores:
    own: np.ndarray
    """Per identity i: the score of i's images against i."""
    margin: np.ndarray
    """Per identity i: own minus the mean score of i's images against every other identity."""
    swap: float


def cross_scores(reads: list[dict[str, np.ndarray]], identities: list[world.Identity]) -> IdentityScores:
    """``reads[i]``: what identity i's images show. Scores every image set against every identity."""
    count = len(identities)
    matrix = np.array([[identity_score(read, other) for other in identities] for read in reads])
    own = np.diag(matrix).copy()
    others = ~np.eye(count, dtype=bool)
    margin = own - np.array([matrix[i][others[i]].mean() for i in range(count)]) if count > 1 else np.zeros(count)
    wins = (own[:, None] > matrix) + 0.5 * (own[:, None] == matrix)
    swap = float(wins[others].mean()) if count > 1 else 0.5
    return IdentityScores(own, margin, swap)


def attribute_margins(reads: list[dict[str, np.ndarray]], identities: list[world.Identity]) -> dict[str, float]:
    """Per identity attribute, the margin on that attribute alone: the share of identity i's images showing
    i's value minus the mean share showing each other identity's value, averaged over the identities
    showing it (hair colour: those with hair). Says WHICH attributes a method carries from the reference."""
    margins = {}
    for name in world.IDENTITY_CHOICES:
        showing = [i for i, identity in enumerate(identities) if name in identity.visible()]
        if len(showing) < 2:
            margins[name] = float("nan")
            continue
        per_identity = []
        for i in showing:
            shown = reads[i][name]
            own = np.mean(shown == identities[i].labels()[name])
            others = np.mean([np.mean(shown == identities[j].labels()[name]) for j in showing if j != i])
            per_identity.append(own - others)
        margins[name] = float(np.mean(per_identity))
    return margins


def standard_error(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def evaluate(w: World, methods: list[str], settings: EvalSettings, on_images=None) -> list[MethodScore]:
    identities = held_out_identities(settings.identities, settings.seed)
    backgrounds = [b for _, b in scene_prompts(settings)]
    wanted = np.array([world.SCENE_CHOICES["background"].index(b) for b in backgrounds])
    scores = []
    for method in methods:
        reads, fidelities, seconds, size = [], [], [], 0
        for identity in identities:
            images, tune_seconds, size = run_method(w, method, identity, settings)
            read = read_images(w.reader, images)
            reads.append(read)
            fidelities.append(float(np.mean(read["background"] == wanted)))
            seconds.append(tune_seconds)
            if on_images is not None:
                on_images(method, identity, images)
        cross = cross_scores(reads, identities)
        scores.append(
            MethodScore(
                method,
                float(cross.own.mean()),
                float(cross.margin.mean()),
                standard_error(cross.margin),
                cross.swap,
                float(np.mean(fidelities)),
                float(np.median(seconds)),
                size,
                cross.own.tolist(),
                cross.margin.tolist(),
                attribute_margins(reads, identities),
            )
        )
    return scores


def chance_identity_score() -> float:
    """What a random identity scores against the reference: the mean of 1/choices over attributes."""
    return float(np.mean([1 / len(choices) for choices in world.IDENTITY_CHOICES.values()]))


# --------------------------------------------------------------------------- does the base model obey its prompts?
OBEDIENCE_BACKGROUND = "blue"


@dataclass
class Obedience:
    what: str
    obeyed: float
    """Share of images whose reader label is the prompted value."""
    chance: float


def obedience_prompts() -> dict[str, list[tuple[str, int]]]:
    """Per reader label: (prompt, the label value it asks for). Identity attributes use the words of
    ``world.ATTRIBUTE_PHRASES``, which only a base model trained with ``describe_attributes`` has seen."""
    prompts = {
        "background": [
            (f"a {world.CLASS_WORD} on {world.article(b)} {b} background", i) for i, b in enumerate(world.BACKGROUNDS)
        ],
        "position": [
            (f"a {world.CLASS_WORD} on a {OBEDIENCE_BACKGROUND} background, {world.POSITION_WORDS[p]}", i)
            for i, p in enumerate(world.POSITIONS)
        ],
    }
    for name, choices in world.IDENTITY_CHOICES.items():
        prompts[name] = [
            (
                f"a {world.CLASS_WORD} with {world.ATTRIBUTE_PHRASES[name](value)} on a {OBEDIENCE_BACKGROUND} background",
                i,
            )
            for i, value in enumerate(choices)
        ]
    return prompts


def prompt_obedience(base, reader, settings: EvalSettings, labels: Optional[list[str]] = None) -> list[Obedience]:
    """How often the plain base model draws what a prompt asks, per reader label.

    Every value of a label is drawn with the same seeds, so a model that ignores
    the word draws nearly the same faces for each value and scores about chance."""
    pipe = plain_pipeline(base)
    size = base.unet.config.sample_size
    shape = (base.unet.config.in_channels, size, size)
    asked_by_label = obedience_prompts()
    unknown = sorted(set(labels or ()) - set(asked_by_label))
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}; choose from {list(asked_by_label)}")
    results = []
    for name, asked in asked_by_label.items():
        if labels is not None and name not in labels:
            continue
        prompts = [prompt for prompt, _ in asked for _ in range(settings.seeds_per_prompt)]
        wanted = np.array([value for _, value in asked for _ in range(settings.seeds_per_prompt)])
        read = read_images(reader, sample_plain(pipe, prompts, settings, shape))
        if name == "hair_colour":  # a bald face shows no hair colour: count only faces with hair
            shown = read["hair"] != world.HAIR_STYLES.index("bald")
            obeyed = float(np.mean(read[name][shown] == wanted[shown])) if shown.any() else float("nan")
        else:
            obeyed = float(np.mean(read[name] == wanted))
        results.append(Obedience(name, obeyed, 1 / len(asked)))
    return results
