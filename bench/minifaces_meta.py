"""A domain pre-trained to be tuned: first-order meta-training of the minifaces checkpoint (a lever).

Each meta-step draws a training identity, tunes a copy of the domain on its
gray-background portrait exactly as ``e4t tune`` does (the domain's tuning
defaults: 5 steps, loss mask, bias and additive changes), then scores the
tuned model on other views of that identity: portraits on random backgrounds,
captioned by the domain's pre-training templates, the encoder still reading
the gray reference. The gradient of that loss at the tuned parameters
(first-order MAML) updates the domain's encoder and weight offsets, plus
``--encoder-only-weight`` times the same loss before tuning (the encoder
alone, as E4T-0 uses it). The held-out identities are never drawn.

    python bench/minifaces_meta.py --work .cache/meta --steps 300 --save-at 150,300
    python bench/minifaces_quality.py --weights .cache/meta/weights-300 --methods e4t-0,e4t-5 --per-attribute

Each ``--save-at`` step writes a weights folder (links to the start_world base,
backbone and reader, and the meta-trained checkpoint in fp16) that
``bench/minifaces_quality.py --weights`` scores. A run started again with the
same ``--work`` continues from its last saved step (the meta-optimizer's
moments start afresh).
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_args, apply_common_args, reserve_stdout_for_json  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the saved weights and the log")
    parser.add_argument("--steps", type=int, default=300, help="meta-steps (one identity each)")
    parser.add_argument("--save-at", default="150,300", help="comma-separated steps at which to save weights")
    parser.add_argument("--meta-lr", type=float, default=2e-4, help="AdamW rate of the domain's parameters")
    parser.add_argument("--inner-steps", type=int, help="tuning steps simulated (default: the domain's)")
    parser.add_argument("--views", type=int, default=8, help="other views of the identity scored per meta-step")
    parser.add_argument(
        "--encoder-only-weight",
        type=float,
        default=1.0,
        help="weight of the other views' loss before tuning (the encoder alone); 0: the tuned loss only",
    )
    parser.add_argument(
        "--face-only",
        action="store_true",
        help="score the other views on the face region alone (the domain's loss mask), not the whole image",
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="the domain checkpoint to start from (default: the start_world one)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="draws the identities, the other views and their noise (the simulated tuning's seed is the step's)",
    )
    parser.add_argument("--json", action="store_true", help="print this run's steps and saved folders as JSON")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    json_out = reserve_stdout_for_json(args.json)

    import torch
    from diffusers import DDPMScheduler
    from e4t_minifaces import WEIGHTS, minifaces_domain, world
    from e4t_minifaces.evaluate import World, default_tuning

    from e4tcli.domain import PLACEHOLDER
    from e4tcli.io.checkpoint import save_checkpoint
    from e4tcli.models.loading import backbone_features
    from e4tcli.models.weight_offsets import shared_factors
    from e4tcli.training.images import latent_distribution, mask_to_latent, square_resize, to_pixels
    from e4tcli.training.step import Batch, training_step
    from e4tcli.training.tune import tune_concept

    domain = minifaces_domain()
    save_at = sorted({int(s) for s in args.save_at.split(",") if s} | {args.steps})
    args.work.mkdir(parents=True, exist_ok=True)
    saved = [
        int(p.parent.parent.name.removeprefix("weights-")) for p in args.work.glob("weights-*/checkpoint/config.json")
    ]
    start = max(saved, default=0)
    start_world = World(WEIGHTS, checkpoint=args.work / f"weights-{start}" / "checkpoint" if start else args.checkpoint)
    if any(name.startswith("biases.") for name in start_world.checkpoint.tensors):
        parser.error("the checkpoint holds pre-trained bias changes, which this script does not meta-train")
    model = start_world.e4t_model()
    scheduler = DDPMScheduler.from_config(model.base.scheduler_config)
    meta = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_trainable_parameters().items()}
    optimizer = torch.optim.AdamW(meta.values(), lr=args.meta_lr, weight_decay=0.0)
    layers = model.encoder_config.backbone_layers
    log_path = args.work / "meta.log"
    kept = (
        [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= start]
        if log_path.exists()
        else []
    )
    log_path.write_text("".join(line + "\n" for line in kept))  # steps after the last save are run again
    log = log_path.open("a")
    records, written = [], []
    started = time.perf_counter()

    def load_meta() -> None:
        with torch.no_grad():
            for name, parameter in model.named_trainable_parameters().items():
                parameter.copy_(meta[name])

    def other_views(identity, features, generator, rng) -> Batch:
        """``args.views`` portraits of ``identity`` on random backgrounds, with their noise and timesteps
        drawn once, so that the loss before and after tuning is measured on the same draws."""
        backgrounds = [rng.choice(list(world.BACKGROUNDS)) for _ in range(args.views)]
        images = [world.render(identity, world.Scene(b, "center")) for b in backgrounds]
        mean, std = latent_distribution(model.vae, to_pixels([square_resize(i, world.RESOLUTION) for i in images]))
        latents = mean + std * torch.randn(mean.shape, generator=generator)
        prompts = [rng.choice(domain.pretrain_templates).format(background=b) for b in backgrounds]
        return Batch(
            latents=latents,
            image_features=features.expand(args.views, -1, -1),
            prompt_ids=model.tokenize(prompts),
            class_prompt_ids=model.tokenize([p.replace(PLACEHOLDER, model.class_word) for p in prompts]),
            noise=torch.randn(latents.shape, generator=generator),
            timesteps=torch.randint(0, scheduler.config.num_train_timesteps, (args.views,), generator=generator),
            loss_mask=torch.cat([mask_to_latent(domain.loss_mask(i), mean.shape[-1]) for i in images])
            if args.face_only
            else None,
        )

    def loss_on(batch: Batch) -> torch.Tensor:
        with shared_factors(model.offsets):
            return training_step(model, batch, scheduler, domain.pretrain.lambda_emb, domain.lambda_weights).total

    def save(step: int) -> None:
        folder = args.work / f"weights-{step}"
        folder.mkdir(exist_ok=True)
        for part in ("base", "backbone", "reader.safetensors"):
            if not (folder / part).exists():
                (folder / part).symlink_to((WEIGHTS / part).resolve())
        config = {
            k: v for k, v in start_world.checkpoint.config.items() if k not in ("format", "version", "fingerprint")
        }
        config["meta"] = {**{k: str(v) for k, v in vars(args).items()}, "step": step}
        save_checkpoint(folder / "checkpoint", config, {k: v.detach().half() for k, v in meta.items()})

    for step in range(start + 1, args.steps + 1):
        rng = random.Random(args.seed * 1_000_003 + step)
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        identity = world.random_identity(rng)
        reference = world.portrait(identity)
        features = backbone_features(start_world.backbone, [reference], layers).float()
        optimizer.zero_grad(set_to_none=True)
        load_meta()
        views = other_views(identity, features, generator, rng)
        for parameter in model.named_trainable_parameters().values():
            parameter.grad = None
        with torch.set_grad_enabled(bool(args.encoder_only_weight)):
            before = loss_on(views)
        if args.encoder_only_weight:
            (args.encoder_only_weight * before).backward()
            for name, parameter in model.named_trainable_parameters().items():
                if parameter.grad is not None:
                    meta[name].grad = parameter.grad.clone()
        settings = default_tuning(seed=step)
        if args.inner_steps is not None:
            settings.steps = args.inner_steps
        tune_losses = tune_concept(
            model, reference, features, domain.prompt_templates, settings, scheduler, domain.loss_mask(reference)
        )
        tuned = {k: v for k, v in model.named_trainable_parameters().items() if k in meta}
        for parameter in model.named_trainable_parameters().values():
            parameter.grad = None
        after = loss_on(views)
        after.backward()
        for name, parameter in tuned.items():
            if parameter.grad is None:
                continue
            meta[name].grad = parameter.grad.clone() if meta[name].grad is None else meta[name].grad + parameter.grad
        optimizer.step()
        model.remove_bias_offsets()
        model.remove_additive_changes()
        record = {
            "step": step,
            "identity": identity.index,
            "seconds": round(time.perf_counter() - started, 1),
            "before": round(float(before.detach()), 5),
            "after": round(float(after.detach()), 5),
            "tune_first": round(tune_losses[0]["denoising"], 5),
            "tune_last": round(tune_losses[-1]["denoising"], 5),
        }
        print(json.dumps(record), file=log, flush=True)
        records.append(record)
        if step in save_at:
            save(step)
            written.append(str(args.work / f"weights-{step}"))
    log.close()
    if args.json:
        print(json.dumps({"steps": records, "saved": written}), file=json_out)
    else:
        print(f"meta-trained to step {args.steps}: weights-N folders and meta.log in {args.work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
