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
    new_model,
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


NO_CHECKPOINT = "none"
"""``--checkpoint none``: tune from the base model, without a pre-trained domain."""


def tunes_from_base(domain: Domain, checkpoint: Optional[str]) -> bool:
    """Whether ``tune`` starts from the base model: asked for, or the domain has no checkpoint."""
    if checkpoint is not None:
        return checkpoint == NO_CHECKPOINT
    return domain.checkpoint is None


def published_checkpoint(domain: Domain, checkpoint: Optional[str]):
    """The domain's published checkpoint when ``tune`` will use it (no --checkpoint given), else None."""
    from e4tcli.io import hub

    return None if checkpoint is not None else hub.published(domain)


def load_domain_checkpoint(domain: Domain, checkpoint: Optional[str], progress: bool = True):
    """The domain checkpoint to tune from: --checkpoint (a folder or a run folder), else the domain's own
    (a folder shipped with the plugin, or its published checkpoint, pulled and verified)."""
    from e4tcli.io import hub
    from e4tcli.io.checkpoint import load_checkpoint

    published = published_checkpoint(domain, checkpoint)
    if published is not None:
        return hub.pull(published, progress)
    source = checkpoint or domain.checkpoint
    if checkpoint is not None and hub.is_hub_id(checkpoint):  # the user's choice: as it is now, unpinned
        return load_checkpoint(hub.download(checkpoint, None, progress))
    if source is None or not Path(source).exists():
        raise UsageError(
            f"domain checkpoint '{source}' not found",
            hint="pass --checkpoint a folder written by 'e4t pretrain', or --checkpoint none to tune from the base model",
        )
    return load_checkpoint(Path(source))


def tuning_defaults(domain: Domain, from_base: bool):
    """The domain's tuning defaults; without a checkpoint, its fallback's (more steps)."""
    return domain.fallback_defaults() if from_base else domain.tune


def tune(options: TuneOptions, domain: Domain, on_step: OnStep = None, progress: bool = True) -> TuneResult:
    """Write the concept. Without a domain checkpoint (``--checkpoint none``, or a domain that names
    none) the encoder head and the offsets start at zero and train for the domain's fallback steps.
    ``progress``: show the download bar when the domain's published checkpoint is pulled."""
    import torch

    from e4tcli.device import choose_placement
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
    from_base = tunes_from_base(domain, options.checkpoint)
    defaults = tuning_defaults(domain, from_base)
    checkpoint = None if from_base else load_domain_checkpoint(domain, options.checkpoint, progress)
    if checkpoint is not None and checkpoint.config["domain"] != domain.name:
        raise UsageError(
            f"checkpoint {checkpoint.folder} was pre-trained for domain '{checkpoint.config['domain']}', "
            f"not '{domain.name}'",
            hint=f"pass --domain {checkpoint.config['domain']}, or a checkpoint of domain '{domain.name}'",
        )
    if domain.preprocess is not None:
        try:
            image = domain.preprocess(image)
        except UsageError as error:
            raise UsageError(f"{options.image}: {error.message}", hint=error.hint) from None

    placement = choose_placement(options.device, options.precision)
    if checkpoint is None:
        base = load_base_model(options.base_model or domain.base_model, placement.device, placement.dtype)
        backbone = load_backbone(options.backbone or domain.backbone, placement.device, placement.dtype)
        torch.manual_seed(options.seed)
        model = new_model(base, backbone, domain, placement)
        recorded_base = {"fingerprint": base.fingerprint}
        recorded_backbone = {
            "source": portable_source(backbone.source, domain.name, domain.backbone),
            "fingerprint": backbone.fingerprint,
        }
        default_resolution = defaults.resolution
    else:
        config = checkpoint.config
        base_source = options.base_model or recorded_source(config["base_model"]["source"], domain.base_model)
        base = load_base_model(base_source, placement.device, placement.dtype)
        check_same("base model", config["base_model"], base.source, base.fingerprint, "--base-model")
        backbone_source = options.backbone or recorded_source(config["backbone"]["source"], domain.backbone)
        backbone = load_backbone(backbone_source, placement.device, placement.dtype)
        check_same("image backbone", config["backbone"], backbone.source, backbone.fingerprint, "--backbone")
        model = E4TModel(
            base,
            domain.class_word,
            EncoderConfig.from_dict(config["encoder"]),
            OffsetConfig(**config["offsets"]),
            placement,
        )
        model.load_trainable_state_dict(checkpoint.tensors)
        recorded_base, recorded_backbone = config["base_model"], config["backbone"]
        default_resolution = config["training"]["resolution"]
    checkpointing = options.gradient_checkpointing
    if checkpointing is None:
        checkpointing = checkpointing_by_default(placement.device)
    if checkpointing:
        enable_gradient_checkpointing(model)

    resolution = options.resolution or default_resolution
    square = square_resize(image, resolution)
    features = backbone_features(backbone, [square], model.encoder_config.backbone_layers)
    offset_learning_rate = options.offset_learning_rate
    if offset_learning_rate is None:
        offset_learning_rate = defaults.offset_learning_rate
    settings = TuneSettings(
        **phase_values(options, defaults, domain),
        resolution=resolution,
        seed=options.seed,
        offset_learning_rate=offset_learning_rate,
        additive_rank=defaults.additive_rank if options.additive_rank is None else options.additive_rank,
        additive_learning_rate=defaults.additive_learning_rate
        if options.additive_learning_rate is None
        else options.additive_learning_rate,
    )
    mask = domain.loss_mask(image) if domain.loss_mask is not None else None
    losses = tune_concept(
        model, square, features, domain.prompt_templates, settings, training_scheduler(base), mask, on_step
    )
    info = {
        "domain": domain.name,
        "class_word": domain.class_word,
        "token": PLACEHOLDER,
        "base_model": recorded_base | {"source": portable_source(base.source, domain.name, domain.base_model)},
        "backbone": recorded_backbone,
        "checkpoint": None
        if checkpoint is None
        else {
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
