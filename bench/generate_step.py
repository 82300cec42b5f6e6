"""Cost of one denoising step: e4t generation vs plain Stable Diffusion.

What it measures: seconds per denoising step of
``e4tcli.pipeline.generate_images`` (classifier-free guidance, plus at every
step the encoder's no-grad UNet pass to the mid block, the encoder, a text
encoder pass for S*, and the q/k/v weight offsets in every UNet call) against
a plain diffusers pipeline of the base model's family (``StableDiffusionPipeline``,
or ``StableDiffusionXLPipeline`` for the ``*-sdxl`` sizes) built from an untouched
copy of the same random base model, with the same scheduler class (the base
model's: PNDM, or Euler for SDXL), the same initial latents, guidance and step count.

The e4t model is built as ``e4t generate`` builds it: a fresh ``E4TModel``
(trainable, zero-initialised), its ``concept_state_dict()`` on random
reference features, then an ``E4TModel`` from that concept. ``--encoder-every``
lists the ``e4t generate --encoder-every`` values to time side by side (1:
the encoder at every step, as published). ``E4TModel`` wraps the UNet's q/k/v and
the token embedding in place, so the baseline runs on a deep copy taken
BEFORE any E4TModel was built; the script checks that the copy has no
offset layers and no placeholder embedding. Because a fresh concept changes
nothing (zero offsets, zero encoder output), both must produce the same
images: the ``max_pixel_diff`` column checks it.

Per-step time is the slope (T(N steps) - T(1 step)) / (N - 1) of the median
wall times, which cancels prompt encoding, VAE decoding and PIL conversion.
The runs are interleaved: every round runs e4t(N) for each K, plain(N),
e4t(1), plain(1) in a rotating order.

Why: the encoder runs at every denoising step; E4T must not make generation
much slower than the base model. TARGET: e4t step <= 1.15x the plain step.

Usage: .venv/bin/python bench/generate_step.py [--size tiny|medium|sd15] [--steps N]
       [--rounds R] [--num-images B] [--encoder-every 1,5] [--device cpu|cuda] [--json]
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CLASS_WORD = "face"


@dataclass
class Config:
    size: str = "tiny"
    steps: int = 10
    rounds: int = 3
    num_images: int = 1
    offsets: str = "paper"
    encoder_every: tuple[int, ...] = (1,)
    device: Optional[str] = None
    json: bool = False


def build(cfg: Config):
    """(e4t model, plain pipeline), sharing nothing that E4T modifies."""
    from e4tcli.device import choose_placement
    from e4tcli.models.e4t import E4TModel
    from e4tcli.models.placeholder import PlaceholderEmbedding
    from e4tcli.models.weight_offsets import OffsetConfig, OffsetLinear
    from e4tcli.pipeline import sampling_scheduler

    placement = choose_placement(cfg.device)
    base = common.build_base(cfg.size, placement.device, placement.dtype)
    plain = common.copy_base(base)  # before any E4TModel touches `base`

    encoder_config = common.encoder_config_for(base, common.vision_config(cfg.size))
    offsets = OffsetConfig(kind=cfg.offsets)
    fresh = E4TModel(base, CLASS_WORD, encoder_config, offsets, placement)
    features = torch.randn(1, len(encoder_config.backbone_layers), encoder_config.backbone_hidden_size)
    concept = fresh.concept_state_dict(features)
    model = E4TModel(base, CLASS_WORD, encoder_config, offsets, placement, concept_tensors=concept)

    assert not any(isinstance(m, OffsetLinear) for m in plain.unet.modules()), "baseline has offsets"
    assert not isinstance(plain.text_encoder.get_input_embeddings(), PlaceholderEmbedding), "baseline has S*"
    pipe = plain.family.pipeline(plain, plain.unet, sampling_scheduler(plain.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


def run(cfg: Config) -> dict:
    import numpy as np

    from e4tcli.pipeline import SamplingSettings, generate_images, initial_latents

    model, pipe = build(cfg)
    device = model.placement.device
    side = common.resolution_of(cfg.size)

    def settings(steps, every=1):
        return SamplingSettings(
            prompt="a photo of S*",
            num_images=cfg.num_images,
            steps=steps,
            height=side,
            width=side,
            encoder_every=every,
        )

    def e4t_every(every):
        return lambda steps: generate_images(model, settings(steps, every))

    e4t = e4t_every(1)

    def plain(steps):
        s = settings(steps)
        return pipe(
            prompt=[s.prompt.replace("S*", CLASS_WORD)] * s.num_images,
            negative_prompt=[s.negative_prompt] * s.num_images if s.negative_prompt else None,
            latents=initial_latents(model, s),
            num_inference_steps=steps,
            guidance_scale=s.guidance,
            height=s.height,
            width=s.width,
            output_type="pil",
        ).images

    def timed(fn, steps):
        common.sync(device)
        start = common.time_ns()
        images = fn(steps)
        common.sync(device)
        return (common.time_ns() - start) / 1e9, images

    # warm-up, and the equality check of a fresh concept against the base model
    _, e4t_images = timed(e4t, cfg.steps)
    _, plain_images = timed(plain, cfg.steps)
    diff = max(
        int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
        for a, b in zip(e4t_images, plain_images)
    )
    timed(e4t, 1)
    timed(plain, 1)

    names = {every: "e4t" if every == 1 else f"e4t, encoder every {every}" for every in cfg.encoder_every}
    jobs = [(names[every], e4t_every(every), cfg.steps) for every in cfg.encoder_every]
    jobs += [("plain", plain, cfg.steps), ("e4t", e4t, 1), ("plain", plain, 1)]
    times = {(name, steps): [] for name, _, steps in jobs}
    for every in cfg.encoder_every:
        times[(names[every], 1)] = times[("e4t", 1)]  # one step runs the encoder once, whatever K
    for round_ in range(cfg.rounds):
        shift = round_ % len(jobs)
        for name, fn, steps in jobs[shift:] + jobs[:shift]:
            times[(name, steps)].append(timed(fn, steps)[0])
    rows = []
    for name in [*names.values(), "plain"]:
        total = common.median(times[(name, cfg.steps)])
        one = common.median(times[(name, 1)])
        rows.append(
            {
                "pipeline": name,
                "s_per_step": (total - one) / (cfg.steps - 1),
                f"s_total_{cfg.steps}_steps": total,
                "s_total_1_step": one,
            }
        )
    for row in rows:
        row["x_plain"] = row["s_per_step"] / rows[-1]["s_per_step"]
    ratio = rows[0]["x_plain"]
    return {
        "size": cfg.size,
        "pipeline_class": type(pipe).__name__,
        "resolution": side,
        "num_images": cfg.num_images,
        "steps": cfg.steps,
        "device": common.describe_device(device),
        "max_pixel_diff": diff,
        "ratio": ratio,
        "rows": rows,
    }


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=common.SIZES, default="tiny")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of the long run (>= 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--offsets", choices=("paper", "lowrank"), default="paper")
    parser.add_argument(
        "--encoder-every", default="1", help="comma-separated K of 'e4t generate --encoder-every' (1: every step)"
    )
    parser.add_argument("--device")
    parser.add_argument("--json", action="store_true")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    common.apply_common_args(args)
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    every = tuple(int(k) for k in args.encoder_every.split(",") if k)
    if not every or min(every) < 1:
        parser.error("--encoder-every takes positive integers, e.g. 1,5")
    every = tuple(sorted(set(every) | {1}))
    return Config(args.size, args.steps, args.rounds, args.num_images, args.offsets, every, args.device, args.json)


def main(argv=None) -> None:
    cfg = parse_args(argv)
    json_out = common.reserve_stdout_for_json(cfg.json)
    torch.manual_seed(0)
    result = run(cfg)
    if cfg.json:
        print(json.dumps(result, indent=2), file=json_out)
        return
    print(
        f"generation step: size={cfg.size} {result['resolution']}px images={cfg.num_images} "
        f"(CFG batch {2 * cfg.num_images}) steps={cfg.steps} offsets={cfg.offsets} device={result['device']} "
        f"rounds={cfg.rounds} (medians; per step = slope between 1 and {cfg.steps} steps)"
    )
    print(f"baseline: {result['pipeline_class']} on a deep copy of the base taken before E4TModel wrapped it")
    common.print_table(result["rows"])
    same = "identical" if result["max_pixel_diff"] == 0 else f"max |diff| {result['max_pixel_diff']}/255"
    print(f"fresh concept vs base model images: {same} (expected identical)")
    for row in result["rows"][:-1]:
        verdict = "OK" if row["x_plain"] <= 1.15 else "MISSED"
        print(f"target step <= 1.15x plain step: {row['pipeline']}: {row['x_plain']:.2f}x {verdict}")


if __name__ == "__main__":
    main()
