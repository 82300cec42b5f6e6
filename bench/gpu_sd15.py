"""End-to-end cost of tuning and generating at SD 1.5 shapes (for a GPU).

What it measures, on random weights with the exact SD 1.5 shapes and a
ViT-H/14-shaped CLIP vision backbone, placed as ``e4t tune`` places them
(``e4tcli.device.choose_placement``: fp16 frozen weights on CUDA, fp32
trainable weights, autocast):

- wall time of ``e4tcli.training.tune.tune_concept`` for 5 steps on a random
  512 px image (VAE encoding of the two views, optimizer creation and the
  steps; not model loading), at batch 1 and 16, without and with gradient
  checkpointing (``e4tcli.api.enable_gradient_checkpointing``);
- wall time of ``e4tcli.pipeline.generate_images`` for 30 steps at 512 px
  (guidance 7.5) with the concept's fixed offsets, 1 and 16 images;
- peak VRAM of each (``torch.cuda.max_memory_allocated``, reset before each
  run; it includes the resident fp16 base model and backbone, as in
  ``e4t tune``, which keeps the backbone loaded).

Each run starts from the same fresh E4T state; one untimed warm-up run comes
first (CUDA context, cuBLAS/cuDNN autotuning). A run that runs out of memory
or hits a non-finite loss is reported as such, not fatal.

Why: the product promise is "personalize in seconds on one GPU".
TARGETS: 5-step tune < 3 s on one H100 (batch 16); peak VRAM < 20 GB at batch 16.

On a CPU it runs at ``--size tiny`` (the default there) or ``medium`` so the
script is known to work; the times then say nothing about GPUs.

Usage: .venv/bin/python bench/gpu_sd15.py [--size tiny|medium|sd15] [--device cuda]
       [--precision auto|fp16|bf16|fp32] [--batches 1,16] [--json]
"""

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CLASS_WORD = "face"
TEMPLATES = ("a photo of S*", "a portrait of S*", "a close-up photo of S*")


@dataclass
class Config:
    size: str
    device: Optional[str] = None
    precision: str = "auto"
    batches: tuple = (1, 16)
    tune_steps: int = 5
    gen_steps: int = 30
    offsets: str = "paper"
    json: bool = False


class Memory:
    """Peak CUDA allocation of a block of work (None on other devices)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.peak_gb = None
        self.reserved_gb = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_gb = torch.cuda.max_memory_allocated() / 2**30
            self.reserved_gb = torch.cuda.max_memory_reserved() / 2**30
        return False


def attempt(fn, device, results=None):
    """(seconds, peak GB, reserved GB, note); failures become notes. ``fn()``'s value is appended to ``results``."""
    from e4tcli.errors import RuntimeFailure

    with Memory(device) as memory:
        start = common.time_ns()
        note = "ok"
        try:
            value = fn()
            if results is not None:
                results.append(value)
        except torch.cuda.OutOfMemoryError:
            note = "out of memory"
        except RuntimeFailure as error:
            note = f"failed: {error}"
        common.sync(device)
        seconds = (common.time_ns() - start) / 1e9
    if note == "out of memory":
        torch.cuda.empty_cache()
    return (seconds if note == "ok" else None), memory.peak_gb, memory.reserved_gb, note


def run(cfg: Config) -> list[dict]:
    from e4tcli.api import enable_gradient_checkpointing, training_scheduler
    from e4tcli.device import choose_placement
    from e4tcli.models.e4t import E4TModel
    from e4tcli.models.loading import backbone_features
    from e4tcli.models.weight_offsets import OffsetConfig
    from e4tcli.pipeline import SamplingSettings, generate_images
    from e4tcli.training.tune import TuneSettings, tune_concept

    placement = choose_placement(cfg.device, cfg.precision)
    device = placement.device
    resolution = common.resolution_of(cfg.size)
    base = common.build_base(cfg.size, device, placement.dtype)
    backbone = common.build_backbone(cfg.size, device, placement.dtype)
    encoder_config = common.encoder_config_for(base, backbone.model.config)
    offsets = OffsetConfig(kind=cfg.offsets)
    model = E4TModel(base, CLASS_WORD, encoder_config, offsets, placement)
    fresh_state = model.trainable_state_dict()
    image = common.random_image(resolution)
    rows = []

    backbone_features(backbone, [image], encoder_config.backbone_layers)  # warm-up
    results = []
    seconds, peak, reserved, note = attempt(
        lambda: backbone_features(backbone, [image], encoder_config.backbone_layers), device, results
    )
    features = results[0]
    rows.append(
        dict(
            phase="backbone features",
            batch=1,
            grad_ckpt="-",
            seconds=seconds,
            peak_gb=peak,
            reserved_gb=reserved,
            note=note,
        )
    )

    def tune(batch, steps):
        model.load_trainable_state_dict(fresh_state)
        settings = TuneSettings(
            steps=steps,
            learning_rate=1.6e-5,
            batch_size=batch,
            resolution=resolution,
            lambda_emb=0.1,
            lambda_weights=1e-4,
        )
        tune_concept(model, image, features, TEMPLATES, settings, training_scheduler(base))

    tune(1, 1)  # warm-up
    for checkpointing in (False, True):
        if checkpointing:
            enable_gradient_checkpointing(model)
        for batch in cfg.batches:
            seconds, peak, reserved, note = attempt(lambda: tune(batch, cfg.tune_steps), device)
            rows.append(
                dict(
                    phase=f"tune {cfg.tune_steps} steps",
                    batch=batch,
                    grad_ckpt="on" if checkpointing else "off",
                    seconds=seconds,
                    peak_gb=peak,
                    reserved_gb=reserved,
                    note=note,
                )
            )

    # Generation as `e4t generate` does it: a concept's fixed offsets, models in eval mode.
    model.load_trainable_state_dict(fresh_state)
    concept = model.concept_state_dict(features[:1])
    base.unet.disable_gradient_checkpointing()
    base.unet.eval()
    for text_encoder in base.text_encoders:
        text_encoder.eval()
    model = None  # the training model's encoder and offsets are freed before generation
    generator_model = E4TModel(base, CLASS_WORD, encoder_config, offsets, placement, concept_tensors=concept)

    def generate(count, steps):
        settings = SamplingSettings(
            prompt="a photo of S*", num_images=count, steps=steps, height=resolution, width=resolution
        )
        generate_images(generator_model, settings)

    generate(1, 2)  # warm-up
    for batch in cfg.batches:
        seconds, peak, reserved, note = attempt(lambda: generate(batch, cfg.gen_steps), device)
        rows.append(
            dict(
                phase=f"generate {cfg.gen_steps} steps",
                batch=batch,
                grad_ckpt="-",
                seconds=seconds,
                peak_gb=peak,
                reserved_gb=reserved,
                note=note,
            )
        )
    return rows


def verdicts(rows: list[dict], cfg: Config) -> list[str]:
    if cfg.size != "sd15":
        return [f"(size {cfg.size}: the targets are for sd15 on one H100; this run only exercises the code)"]
    lines = []
    for row in rows:
        if row["phase"].startswith("tune") and row["batch"] == 16 and row["note"] == "ok":
            tag = f"tune batch 16, grad_ckpt {row['grad_ckpt']}"
            ok = "OK" if row["seconds"] < 3 else "MISSED"
            lines.append(f"target {tag}: < 3 s -> {row['seconds']:.2f} s {ok}")
            if row["peak_gb"] is not None:
                ok = "OK" if row["peak_gb"] < 20 else "MISSED"
                lines.append(f"target {tag}: peak VRAM < 20 GB -> {row['peak_gb']:.1f} GB {ok}")
    return lines


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=common.SIZES, help="default: sd15 on CUDA, tiny elsewhere")
    parser.add_argument("--device")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--tune-steps", type=int, default=5)
    parser.add_argument("--gen-steps", type=int, default=30)
    parser.add_argument("--offsets", choices=("paper", "lowrank"), default="paper")
    parser.add_argument("--json", action="store_true")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    common.apply_common_args(args)
    size = args.size
    if size is None:
        cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        size = "sd15" if cuda else "tiny"
    batches = tuple(int(b) for b in args.batches.split(","))
    return Config(size, args.device, args.precision, batches, args.tune_steps, args.gen_steps, args.offsets, args.json)


def main(argv=None) -> None:
    cfg = parse_args(argv)
    json_out = common.reserve_stdout_for_json(cfg.json)
    torch.manual_seed(0)
    start = common.time_ns()
    rows = run(cfg)
    total = (common.time_ns() - start) / 1e9
    if cfg.json:
        print(json.dumps({"config": asdict(cfg), "rows": rows, "total_seconds": total}, indent=2), file=json_out)
        return
    from e4tcli.device import choose_placement

    placement = choose_placement(cfg.device, cfg.precision)
    print(
        f"sd15 bench: size={cfg.size} {common.resolution_of(cfg.size)}px "
        f"device={common.describe_device(placement.device)} "
        f"frozen dtype={str(placement.dtype).removeprefix('torch.')} offsets={cfg.offsets} (total {total:.1f} s)"
    )
    print("peak_gb = torch.cuda.max_memory_allocated per run, incl. resident fp16 base model + backbone (empty on CPU)")
    common.print_table(rows)
    for line in verdicts(rows, cfg):
        print(line)


if __name__ == "__main__":
    main()
