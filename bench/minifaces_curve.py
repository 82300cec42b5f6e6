"""Learning curve of the minifaces domain: identity margins of E4T-0 and E4T-5 against pre-training steps.

Pre-trains a domain on the shipped base model and backbone with ``e4t``'s own
pre-training (``e4tcli.api.pretrain``, the minifaces domain's defaults unless
overridden), keeping a checkpoint at every step listed in ``--evaluate-at``,
then scores each with ``e4t_minifaces.evaluate`` on the held-out identities
(the same identities, prompts, seeds and reader as ``bench/minifaces_quality.py``).

    python bench/minifaces_curve.py --work .cache/curve --steps 4000 --evaluate-at 250,1000,2000,4000
    python bench/minifaces_curve.py --work .cache/curve --portraits 50000 --minutes 20   # stop pre-training after 20 min (loading and feature cache included)

An interrupted run continues from its last checkpoint when started again with
the same ``--work``. ``--minutes`` stops training after that long and scores
the checkpoints that exist.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_additive_rank_arg,
    add_common_args,
    add_loss_mask_arg,
    apply_common_args,
    print_table,
    reserve_stdout_for_json,
)


def zero_unet_features() -> None:
    """The encoder reads the reference alone: its input from the noisy latent is zeroed in pre-training,
    tuning and generation (a diagnosis: in pre-training that latent is the reference itself, a possible
    shortcut)."""
    import torch

    from e4tcli.models.encoder import ConceptEncoder, E4TEncoder

    encoder_forward, concept_forward = E4TEncoder.forward, ConceptEncoder.forward
    E4TEncoder.forward = lambda self, image, unet: encoder_forward(self, image, torch.zeros_like(unet))
    ConceptEncoder.forward = lambda self, unet: concept_forward(self, torch.zeros_like(unet))


def bias_timesteps_high() -> None:
    """Pre-training draws t = T * sqrt(u) (u uniform) instead of T * u: three quarters of the samples
    above T/2, where less of the reference is left in the noisy latent (a lever)."""
    import torch

    import e4tcli.training.pretrain as pretrain

    make_batch = pretrain.make_batch

    def biased(model, mean, std, features, samples, noise_scheduler, prompts=None):
        batch = make_batch(model, mean, std, features, samples, noise_scheduler, prompts)
        total = noise_scheduler.config.num_train_timesteps
        uniform = (batch.timesteps.float() + 0.5) / total
        batch.timesteps = torch.clamp((total * uniform.sqrt()).long(), max=total - 1)
        return batch

    pretrain.make_batch = biased


def contrast_words(weight: float, margin: float = 0.005) -> None:
    """Pre-training adds ``weight * relu(margin - (loss(x_A | word of B) - loss(x_A | word of A)))``, B being
    the next element of the batch: each reference's word must denoise its own image better than another
    reference's word does (a lever; one more text-encoder and UNet pass per step). It replaces
    ``training_step`` for this script's fp32 pre-training only: no autocast, no loss mask."""
    import torch

    import e4tcli.training.pretrain as pretrain
    from e4tcli.training.step import StepLosses, diffusion_target

    def step(model, batch, noise_scheduler, lambda_emb, lambda_weights, generator=None):
        noisy = noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        with torch.no_grad():
            class_states = model.encode_text(batch.class_prompt_ids)
        concept, offset = model.concept_embedding(batch.image_features, noisy, batch.timesteps, class_states)
        target = diffusion_target(noise_scheduler, batch.latents, batch.noise, batch.timesteps).float()

        def errors(words):
            states = model.encode_text(batch.prompt_ids, concept=words)
            prediction = model.unet(noisy, batch.timesteps, encoder_hidden_states=states).sample.float()
            return ((prediction - target) ** 2).mean(dim=(1, 2, 3))

        own, other = errors(concept), errors(concept.roll(1, 0))
        denoising, weights = own.mean(), model.offsets_squared_norm()
        embedding = offset.pow(2).sum(dim=-1).mean()
        contrast = torch.relu(margin - (other - own)).mean()
        total = denoising + weight * contrast + lambda_emb * embedding + lambda_weights * weights
        return StepLosses(total, denoising, embedding, weights)

    pretrain.training_step = step


def freeze_offsets() -> None:
    """Pre-training leaves the weight offsets at zero: the encoder alone adapts (a diagnosis)."""
    import e4tcli.training.pretrain as pretrain

    init = pretrain.TrainableParts.__init__

    def frozen(self, model):
        init(self, model)
        self.offsets.requires_grad_(False)

    pretrain.TrainableParts.__init__ = frozen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the portraits, the run and the scores")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--evaluate-at", default="250,1000,2000,4000", help="comma-separated steps to score")
    parser.add_argument("--portraits", type=int, default=3000, help="pre-training portraits of training identities")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--lambda-emb", type=float)
    parser.add_argument("--methods", default="e4t-0,e4t-5")
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--seeds-per-prompt", type=int, default=2)
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument(
        "--weights",
        type=Path,
        help="a folder with base/, backbone/ and reader.safetensors (default: the installed minifaces package's)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="stop pre-training this long after the start, loading and feature cache included (0: never)",
    )
    parser.add_argument(
        "--without-unet-features",
        action="store_true",
        help="an ablation: zero the encoder's pooled UNet-feature input, in pre-training and scoring",
    )
    parser.add_argument(
        "--timestep-bias", action="store_true", help="a lever: draw pre-training timesteps as T * sqrt(u)"
    )
    parser.add_argument(
        "--contrastive",
        type=float,
        default=0.0,
        help="a lever: weight of a term asking each word to denoise its own reference better than another's",
    )
    parser.add_argument(
        "--frozen-offsets", action="store_true", help="a diagnosis: pre-train the encoder alone, offsets at zero"
    )
    parser.add_argument(
        "--pretrain-bias-lr",
        type=float,
        help="pre-train the UNet's bias changes with the domain at this rate (default: the domain's; 0: not)",
    )
    add_additive_rank_arg(parser)
    parser.add_argument("--json", action="store_true", help="print the scores as JSON instead of a table")
    add_loss_mask_arg(parser)
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    json_out = reserve_stdout_for_json(args.json)

    from e4t_minifaces import WEIGHTS, minifaces_domain
    from e4t_minifaces.build import write_portraits
    from e4t_minifaces.evaluate import EvalSettings, World, evaluate

    from e4tcli import api
    from e4tcli.memory import peak_rss_mb
    from e4tcli.stopping import Interrupted

    weights = args.weights or WEIGHTS
    if args.without_unet_features:
        zero_unet_features()
    if args.timestep_bias:
        bias_timesteps_high()
    if args.contrastive:
        contrast_words(args.contrastive)
    if args.frozen_offsets:
        freeze_offsets()
    evaluate_at = sorted({int(s) for s in args.evaluate_at.split(",") if s} | {args.steps})
    args.work.mkdir(parents=True, exist_ok=True)
    portraits = args.work / f"portraits-{args.portraits}"
    write_portraits(portraits, args.portraits, seed=5)
    run = args.work / "run"
    every = math.gcd(*evaluate_at)
    options = api.PretrainOptions(
        data=str(portraits),
        out=str(run),
        base_model=str(weights / "base"),
        backbone=str(weights / "backbone"),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        lambda_emb=args.lambda_emb,
        bias_learning_rate=args.pretrain_bias_lr,
        checkpoint_every=every,
        keep_last=10**6,
        cache_features=True,
        device=args.device,
        precision="fp32",
        resume="latest" if (run / "latest").exists() else None,
        force=True,
    )
    started = time.perf_counter()
    log = (args.work / "train.log").open("a")

    def on_step(step, losses):
        if step % 100 == 0:
            record = {"step": step, "seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": peak_rss_mb()}
            print(json.dumps({**record, **losses.as_floats()}), file=log, flush=True)
        if args.minutes and time.perf_counter() - started > args.minutes * 60:
            os.kill(os.getpid(), signal.SIGINT)  # pre-training saves a resumable checkpoint and stops

    try:
        api.pretrain(options, minifaces_domain(), on_step=on_step)
    except Interrupted as stopped:
        print(f"training stopped early: {stopped}", file=sys.stderr)
    train_seconds = time.perf_counter() - started

    settings = EvalSettings(
        identities=args.identities,
        seeds_per_prompt=args.seeds_per_prompt,
        sampling_steps=args.sampling_steps,
        e4t_loss_mask=args.loss_mask,
        additive_rank=args.additive_rank,
    )
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    reached = sorted(int(path.name.removeprefix("checkpoint-")) for path in run.glob("checkpoint-*"))
    for step in [s for s in evaluate_at if s in reached] + [s for s in reached[-1:] if s not in evaluate_at]:
        folder = run / f"checkpoint-{step:07d}"
        world = World(weights, device=args.device, checkpoint=folder)
        for score in evaluate(world, methods, settings):
            batch = world.checkpoint.config["training"]["batch_size"]
            rows.append(
                {
                    "step": step,
                    "portraits seen": step * batch,
                    "method": score.method,
                    "own": round(score.identity, 3),
                    "margin": round(score.margin, 3),
                    "margin se": round(score.margin_stderr, 3),
                    "swap": round(score.swap, 3),
                    "fidelity": round(score.fidelity, 3),
                    "per attribute (head skin eyes spacing mouth hair colour)": " ".join(
                        f"{value:+.2f}" for value in score.attribute_margin.values()
                    ),
                    "per_identity_margin": [round(m, 4) for m in score.per_identity_margin],
                }
            )
        (args.work / "curve.json").write_text(json.dumps({"train_seconds": train_seconds, "rows": rows}, indent=1))
    if args.json:
        print(json.dumps({"train_seconds": train_seconds, "rows": rows}), file=json_out)
        return 0
    print_table(
        [{k: v for k, v in row.items() if k != "per_identity_margin"} for row in rows],
        title=f"{args.portraits} portraits, {args.identities} held-out identities, trained {train_seconds / 60:.1f} min",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
