"""What does the pre-training loss pay for each identity attribute? Measured with the base model's own words.

For each held-out identity's portrait, the base model's denoising loss is
computed with a caption naming one attribute's right value ("a face with
round head on a gray background") and with each wrong value, on the same
noisy latents, and with a caption naming no attribute ("a face on a gray
background"). Two gains per attribute and timestep range: over the caption
naming nothing, loss(none) - loss(right), is what pre-training pays a word
for carrying the attribute rather than leaving it out; over a wrong value,
loss(wrong) - loss(right), what it pays for not carrying a wrong one.

    python bench/minifaces_word_gain.py --threads 1
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_args, apply_common_args, print_table, reserve_stdout_for_json  # noqa: E402

RANGES = ((0, 250), (250, 500), (500, 750), (750, 1000))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--samples", type=int, default=32, help="noisy latents per identity and timestep range")
    parser.add_argument("--weights", type=Path, help="a weights folder (default: the installed minifaces package's)")
    parser.add_argument("--json", action="store_true", help="print the gains as JSON instead of tables")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    json_out = reserve_stdout_for_json(args.json)

    import numpy as np
    import torch
    from diffusers import DDPMScheduler
    from e4t_minifaces import WEIGHTS, world
    from e4t_minifaces.evaluate import EvalSettings, World, held_out_identities

    from e4tcli.training.images import latent_distribution, to_pixels

    base = World(args.weights or WEIGHTS).plain
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    identities = held_out_identities(args.identities, EvalSettings().seed)
    over_none: dict = {name: {r: [] for r in RANGES} for name in world.IDENTITY_CHOICES}
    over_wrong: dict = {name: {r: [] for r in RANGES} for name in world.IDENTITY_CHOICES}

    def states(caption: str) -> torch.Tensor:
        ids = base.tokenizer(
            [caption], padding="max_length", max_length=base.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        return base.text_encoder(ids)[0].expand(args.samples, -1, -1)

    with torch.no_grad():
        for k, identity in enumerate(identities):
            mean, std = latent_distribution(base.vae, to_pixels([world.portrait(identity)]))
            generator = torch.Generator().manual_seed(k)
            for low, high in RANGES:
                latents = mean + std * torch.randn((args.samples, *mean.shape[1:]), generator=generator)
                noise = torch.randn(latents.shape, generator=generator)
                timesteps = torch.randint(low, high, (args.samples,), generator=generator)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)

                def loss(phrase: str) -> float:
                    subject = f"{world.CLASS_WORD} with {phrase}" if phrase else world.CLASS_WORD
                    caption = f"a {subject} on a {world.PORTRAIT_BACKGROUND} background"
                    prediction = base.unet(noisy, timesteps, encoder_hidden_states=states(caption)).sample
                    return float(((prediction - noise) ** 2).mean())

                unnamed = loss("")
                for name, choices in world.IDENTITY_CHOICES.items():
                    if name not in identity.visible():
                        continue
                    right = getattr(identity, name)
                    named = loss(world.ATTRIBUTE_PHRASES[name](right))
                    wrong = np.mean([loss(world.ATTRIBUTE_PHRASES[name](v)) for v in choices if v != right])
                    over_none[name][(low, high)].append(unnamed - named)
                    over_wrong[name][(low, high)].append(wrong - named)

    if args.json:
        summary = {
            key: {
                name: {f"{low}-{high}": float(np.mean(values)) for (low, high), values in by_range.items()}
                for name, by_range in gains.items()
            }
            for key, gains in (("over_none", over_none), ("over_wrong", over_wrong))
        }
        print(json.dumps(summary), file=json_out)
        return 0
    for gains, against in ((over_none, "naming nothing: loss(none)"), (over_wrong, "a wrong value: loss(wrong)")):
        rows = []
        for name, by_range in gains.items():
            row = {"attribute": name}
            for (low, high), values in by_range.items():
                values = np.asarray(values) * 1e3
                row[f"t {low}-{high}"] = f"{values.mean():+.2f} ± {values.std(ddof=1) / np.sqrt(len(values)):.2f}"
            rows.append(row)
        print_table(
            rows,
            title=(
                f"denoising-loss gain x 1e3 of naming the right value over {against} - loss(right); "
                f"{args.identities} held-out identities x {args.samples} noisy latents, ± standard error"
            ),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
