"""`e4t tune` as a library call: one image, a domain checkpoint and a Domain in, one concept file out."""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from e4tcli import __version__
from e4tcli.api.common import (
    OnStep,
    check_same,
    checkpointing_by_default,
    enable_gradient_checkpointing,
    phase_values,
    training_scheduler,
)
from e4tcli.domain import PLACEHOLDER, Domain
from e4tcli.errors import UsageError
from e4tcli.io.destinations import check_new_file
from e4tcli.io.sources import portable_source, recorded_source
from e4tcli.options import TuneOptions


@dataclass
class TuneResult:
    concept: Path
    size_bytes: int
    steps: int
    seconds: float
    seed: int
    losses: list = field(repr=False)


def load_user_image(path: str):
    from e4tcli.datasets import load_rgb

    if not Path(path).is_file():
        raise UsageError(f"image not found: {path}", hint="pass the path of a jpg, png or webp file")
    try:
        return load_rgb(path)
    except Exception as error:
        raise UsageError(
            f"cannot read {path} as an image ({type(error).__name__})", hint="pass a jpg, png or webp file"
        ) from None


def resolve_checkpoint(domain: Domain, checkpoint: Optional[str]) -> Path:
    source = checkpoint or domain.checkpoint
    if source is None:
        raise UsageError(
            f"domain '{domain.name}' has no published checkpoint",
            hint=f"pass --checkpoint DIR (make one with 'e4t pretrain --domain {domain.name} --data ... --out DIR')",
        )
    if Path(source).exists():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source))
    except Exception as error:
        raise UsageError(
            f"domain checkpoint '{source}' is neither a folder nor a downloadable hub id ({type(error).__name__})",
            hint="pass --checkpoint a folder written by 'e4t pretrain'",
        ) from None


def tune(options: TuneOptions, domain: Domain, on_step: OnStep = None) -> TuneResult:
    from e4tcli.device import choose_placement
    from e4tcli.io.checkpoint import load_checkpoint
    from e4tcli.io.concept import save_concept
    from e4tcli.models.e4t import E4TModel
    from e4tcli.models.encoder import EncoderConfig
    from e4tcli.models.loading import backbone_features, load_backbone, load_base_model
    from e4tcli.models.weight_offsets import OffsetConfig
    from e4tcli.training.images import square_resize
    from e4tcli.training.tune import TuneSettings, tune_concept

    start = time.perf_counter()
    image = load_user_image(options.image)
    out = Path(options.out) if options.out else Path(options.image).with_suffix(".e4t.safetensors")
    if out.suffix != ".safetensors":
        raise UsageError(f"concept files end in .safetensors, got '{out}'", hint="pass --out NAME.safetensors")
    check_new_file(out, options.force)
    checkpoint_dir = resolve_checkpoint(domain, options.checkpoint)
    checkpoint = load_checkpoint(checkpoint_dir)
    config = checkpoint.config
    if config["domain"] != domain.name:
        raise UsageError(
            f"checkpoint {checkpoint_dir} was pre-trained for domain '{config['domain']}', not '{domain.name}'",
            hint=f"pass --domain {config['domain']}, or a checkpoint of domain '{domain.name}'",
        )
    if domain.preprocess is not None:
        try:
            image = domain.preprocess(image)
        except UsageError as error:
            raise UsageError(f"{options.image}: {error.message}", hint=error.hint) from None

    placement = choose_placement(options.device, options.precision)
    base_source = options.base_model or recorded_source(config["base_model"]["source"], domain.base_model)
    base = load_base_model(base_source, placement.device, placement.dtype)
    check_same("base model", config["base_model"], base.source, base.fingerprint, "--base-model")
    backbone_source = recorded_source(config["backbone"]["source"], domain.backbone)
    backbone = load_backbone(backbone_source, placement.device, placement.dtype)
    check_same("image backbone", config["backbone"], backbone.source, backbone.fingerprint, "the backbone")
    encoder_config = EncoderConfig.from_dict(config["encoder"])
    model = E4TModel(base, domain.class_word, encoder_config, OffsetConfig(**config["offsets"]), placement)
    model.load_trainable_state_dict(checkpoint.tensors)
    checkpointing = options.gradient_checkpointing
    if checkpointing is None:
        checkpointing = checkpointing_by_default(placement.device)
    if checkpointing:
        enable_gradient_checkpointing(model)

    resolution = options.resolution or config["training"]["resolution"]
    square = square_resize(image, resolution)
    features = backbone_features(backbone, [square], encoder_config.backbone_layers)
    defaults = domain.tune
    settings = TuneSettings(**phase_values(options, defaults, domain), resolution=resolution, seed=options.seed)
    mask = domain.loss_mask(image) if domain.loss_mask is not None else None
    losses = tune_concept(
        model, square, features, domain.prompt_templates, settings, training_scheduler(base), mask, on_step
    )
    info = {
        "domain": domain.name,
        "class_word": domain.class_word,
        "token": PLACEHOLDER,
        "base_model": config["base_model"] | {"source": portable_source(base.source, domain.name, domain.base_model)},
        "backbone": config["backbone"],
        "checkpoint": {
            "source": portable_source(str(options.checkpoint or domain.checkpoint), domain.name, domain.checkpoint),
            "fingerprint": checkpoint.fingerprint,
        },
        **model.describe(),
        "tuning": asdict(settings),
        "image": Path(options.image).name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "e4t_version": __version__,
    }
    size = save_concept(out, model.concept_state_dict(features[:1]), info, options.save_precision)
    return TuneResult(out, size, settings.steps, time.perf_counter() - start, options.seed, losses)
