"""`e4t generate` as a library call: a concept file and a prompt in, images out."""

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from e4tcli import __version__
from e4tcli.api.common import check_same, installed_base_model
from e4tcli.errors import UsageError
from e4tcli.io.destinations import check_output_folder, free_names
from e4tcli.io.sources import portable_source, recorded_source
from e4tcli.options import GenerateOptions, check_values


@dataclass
class GenerateResult:
    images: list[Path]
    grid: Optional[Path]
    seconds: float
    seed: int
    renamed: bool = False
    """The usual names were taken, so the images are ``NAME-runK.png``."""


def default_batch_size(device_type: str, height: int, width: int) -> int:
    """8 images of 512x512 at once on a GPU (fewer for larger images), 4 on a CPU: large enough to keep
    the device busy, small enough that memory stays flat and little is lost to an interruption."""
    if device_type == "cpu":
        return 4
    budget = 8 * 512 * 512 if device_type == "cuda" else 2 * 512 * 512
    return max(1, min(8, budget // (height * width)))


class GenerationProgress:
    """What ``generate`` reports while it runs (the CLI draws a progress bar from it)."""

    def start(self, images: int, steps_per_batch: int, batches: int) -> None: ...

    def denoising_step(self) -> None: ...

    def image_written(self, path: Path) -> None: ...


def load_concept_model(concept_path: str, base_model: Optional[str], placement):
    """A base model with a concept applied, and the concept itself."""
    from e4tcli.io.concept import load_concept
    from e4tcli.models.e4t import E4TModel
    from e4tcli.models.encoder import EncoderConfig
    from e4tcli.models.loading import load_base_model
    from e4tcli.models.weight_offsets import OffsetConfig

    concept = load_concept(Path(concept_path))
    info = concept.info
    base_source = base_model or recorded_source(
        info["base_model"]["source"], lambda: installed_base_model(info["domain"])
    )
    base = load_base_model(base_source, placement.device, placement.dtype)
    check_same("base model", info["base_model"], base.source, base.fingerprint, "--base-model")
    encoder_config = EncoderConfig.from_dict(info["encoder"])
    model = E4TModel(
        base, info["class_word"], encoder_config, OffsetConfig(**info["offsets"]), placement, concept.tensors
    )
    return model, concept


def generate(options: GenerateOptions, progress: Optional[GenerationProgress] = None) -> GenerateResult:
    """Images written batch by batch as they finish; SIGINT/SIGTERM stop the run, keeping them."""
    from e4tcli.device import choose_placement
    from e4tcli.io.atomic import atomic_file
    from e4tcli.pipeline import GRID_MAX_SIDE, SamplingSettings, Stopped, build_pipeline, generate_images, image_grid
    from e4tcli.stopping import Interrupted, StopRequest

    start = time.perf_counter()
    progress = progress or GenerationProgress()
    check_values(options)  # again: a caller may have changed a field after construction
    out = Path(options.out)
    check_output_folder(out)
    placement = choose_placement(options.device, options.precision)
    model, concept = load_concept_model(options.concept, options.base_model, placement)
    resolution = concept.info["tuning"]["resolution"]
    settings = SamplingSettings(
        prompt=options.prompt,
        negative_prompt=options.negative_prompt,
        num_images=options.num_images,
        seed=options.seed,
        steps=options.steps,
        guidance=options.guidance,
        height=options.height or resolution,
        width=options.width or resolution,
        encoder_every=options.encoder_every,
    )
    if settings.height % 8 or settings.width % 8:
        raise UsageError(f"--height and --width must be multiples of 8 (got {settings.height}x{settings.width})")
    batch_size = options.batch_size or default_batch_size(placement.device.type, settings.height, settings.width)
    stem = Path(options.concept).name.removesuffix(".safetensors").removesuffix(".e4t")
    count = settings.num_images
    grid_name = [f"{stem}-{settings.seed}-grid.png"] if count > 1 else []
    names, renamed = free_names(
        out, [f"{stem}-{settings.seed + i}.png" for i in range(count)] + grid_name, options.force
    )
    base_source = portable_source(
        model.base.source, concept.info["domain"], installed_base_model(concept.info["domain"])
    )
    pipe = build_pipeline(model)
    batches = range(0, count, batch_size)
    progress.start(count, settings.steps, len(batches))
    paths: list[Path] = []
    with StopRequest() as stop:

        def on_step() -> None:
            if stop.signal_name:
                raise Stopped
            progress.denoising_step()

        try:
            for first in batches:
                batch = replace(settings, seed=settings.seed + first, num_images=min(batch_size, count - first))
                images = generate_images(model, batch, pipe, on_step=on_step)
                for i, image in enumerate(images):
                    path = out / names[first + i]
                    metadata = png_metadata(settings, concept, base_source, model.family.name, seed=batch.seed + i)
                    with atomic_file(path) as tmp:
                        image.save(tmp, format="PNG", pnginfo=png_info(metadata))
                    paths.append(path)
                    progress.image_written(path)
                if stop.signal_name:
                    raise Stopped
        except Stopped:
            raise Interrupted(
                f"stopped by {stop.signal_name}: {len(paths)} of {count} images written to {out}",
                signal_name=stop.signal_name,
                hint=f"the rest start at --seed {settings.seed + len(paths)} -n {count - len(paths)}",
            ) from None
    grid = None
    if grid_name:
        grid = out / names[-1]
        metadata = png_metadata(settings, concept, base_source, model.family.name, seed=settings.seed)
        with atomic_file(grid) as tmp:
            image_grid(paths, max_side=GRID_MAX_SIDE).save(tmp, format="PNG", pnginfo=png_info(metadata))
    return GenerateResult(paths, grid, time.perf_counter() - start, settings.seed, renamed)


def png_metadata(settings, concept, base_source: str, family: str, seed: int) -> dict[str, str]:
    parameters = (
        f"{settings.prompt}\nNegative prompt: {settings.negative_prompt}\n"
        f"Steps: {settings.steps}, CFG scale: {settings.guidance:g}, Seed: {seed}, "
        f"Size: {settings.width}x{settings.height}, Model: {base_source}, e4t concept: {concept.path.name}"
    )
    return {
        "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt,
        "seed": str(seed),
        "steps": str(settings.steps),
        "guidance": f"{settings.guidance:g}",
        "encoder_every": str(settings.encoder_every),
        "size": f"{settings.width}x{settings.height}",
        "concept": concept.path.name,
        "concept_domain": concept.info["domain"],
        "base_model": base_source,
        "model_family": family,
        "e4t_version": __version__,
        "parameters": parameters,
    }


def png_info(metadata: dict[str, str]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, value)
    return info
