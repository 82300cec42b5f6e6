"""Does E4T personalize? The paper's claim, checked on the miniature world, on a CPU.

Held-out identities (never seen by the base model, the backbone or the domain
pre-training) are each personalized from ONE reference portrait, then drawn
on four prompted backgrounds with the same seeds for every method. An
attribute reader, trained on generator output only, says what each image
shows. Identity score ("own"): share of the 7 identity attributes matching the
reference. Margin: own minus the score of the same images against the other
evaluated identities (0 for a method that ignores the reference), with its
standard error over identities. Swap: share of identity pairs (A, B) whose
B-images match B better than A (0.5 when the reference is ignored). Prompt
fidelity: share of images with the prompted background.

    python bench/minifaces_quality.py                 # the README table (all methods, 16 identities)
    python bench/minifaces_quality.py --methods base,e4t-5 --identities 3
    python bench/minifaces_quality.py --grid docs/minifaces-grid.png   # also save a picture of E4T-5's output
"""

import argparse
import json
import sys
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

ALL_METHODS = "base,e4t-0,e4t-5,e4t-15,ti-5,ti-50,ti-500,dreambooth-5,dreambooth-50,dreambooth-200"


def human_size(size: int) -> str:
    if size == 0:
        return "-"
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def save_grid(path: Path, rows: list[list]) -> None:
    """Each row: the reference portrait, then its generated images; upscaled 4x (nearest) to be visible."""
    from PIL import Image

    from e4tcli.io.atomic import atomic_file

    cell, gap = 128, 8
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (columns * cell + gap, len(rows) * cell), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            left = x * cell + (gap if x else 0)
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (left, y * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        grid.save(tmp, format="PNG", optimize=True)


TUNE_TIMESTEPS = {
    "uniform": (0.0, 1.0, False),
    "above-quarter": (0.25, 1.0, False),
    "above-half": (0.5, 1.0, False),
    "below-half": (0.0, 0.5, False),
    "sqrt": (0.0, 1.0, True),
    "stratified": (0.0, 1.0, False),
}


def draw_tuning_timesteps(name: str) -> None:
    """E4T's tuning steps draw t = low * T + v * (high - low) * T, v uniform (or the square root of one, or one
    from each of the batch's equal slices) in [0, 1), instead of uniform over [0, T): a lever, measured in
    docs/minifaces.md; pre-training is unchanged."""
    import torch

    import e4tcli.training.tune as tune

    low, high, square_root = TUNE_TIMESTEPS[name]
    step = tune.training_step

    def drawn(model, batch, noise_scheduler, lambda_emb, lambda_weights, generator=None):
        total = noise_scheduler.config.num_train_timesteps
        start, end = int(low * total), int(high * total)
        count = batch.latents.shape[0]
        v = torch.rand(count, generator=generator, device=batch.latents.device)
        v = v.sqrt() if square_root else v
        if name == "stratified":  # one draw from each of `count` equal slices of [0, T), in random order
            order = torch.randperm(count, generator=generator, device=batch.latents.device)
            v = (order + v) / count
        batch.timesteps = (start + v * (end - start)).long().clamp(max=total - 1)
        return step(model, batch, noise_scheduler, lambda_emb, lambda_weights, generator)

    tune.training_step = drawn


TUNE_RATE_SCHEDULES = ("constant", "decay", "rise")


def schedule_tuning_rates(shape: str) -> None:
    """Step k of E4T's N tuning steps runs at 2 (N - k + 1) / (N + 1) ("decay") or 2 k / (N + 1) ("rise")
    times each parameter group's rate, the same mean rate as "constant" (e4t tune's): a lever, measured in
    docs/minifaces.md."""
    import e4tcli.training.tune as tune

    tune_concept, optimizer_for = tune.tune_concept, tune.optimizer_for
    steps = {}

    def counted(model, image, image_features, prompt_templates, settings, *args, **kwargs):
        steps["count"] = settings.steps
        return tune_concept(model, image, image_features, prompt_templates, settings, *args, **kwargs)

    def scheduled(*args, **kwargs):
        optimizer = optimizer_for(*args, **kwargs)
        count, rates, taken = steps["count"], [group["lr"] for group in optimizer.param_groups], [0]
        step = optimizer.step

        def scheduled_step(*step_args, **step_kwargs):
            taken[0] += 1
            k = taken[0]
            scale = 2 * (count - k + 1 if shape == "decay" else k) / (count + 1)
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate * scale
            return step(*step_args, **step_kwargs)

        optimizer.step = scheduled_step
        return optimizer

    tune.tune_concept, tune.optimizer_for = counted, scheduled


def main(argv=None) -> int:
    from e4t_minifaces.evaluate import BIAS_LR

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=ALL_METHODS)
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--seeds-per-prompt", type=int, default=2)
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="draws the held-out identities and the sampling noise (another seed: other identities)",
    )
    parser.add_argument(
        "--e4t-lr", type=float, help="E4T's tuning learning rate of the encoder (default: the domain's)"
    )
    parser.add_argument(
        "--e4t-lambda-emb", type=float, help="E4T's tuning weight of ||offset||^2 (default: the domain's)"
    )
    parser.add_argument(
        "--e4t-offset-lr",
        type=float,
        help="E4T's tuning learning rate of the weight offsets (default: the domain's offset rate, else --e4t-lr's)",
    )
    parser.add_argument("--e4t-batch-size", type=int, help="E4T's tuning batch size (default: the domain's)")
    parser.add_argument(
        "--bias-lr",
        type=float,
        help="E4T's tuning rate of the UNet's bias changes (default: the domain's; 0: not tuned);"
        f" e4t-biases-N tunes them at {BIAS_LR} where neither sets a rate (0 included)",
    )
    parser.add_argument(
        "--concept-precision", default="int8", help="how E4T's concept file stores its tensors (int8, fp16, fp32)"
    )
    parser.add_argument(
        "--encoder-every", type=int, default=1, help="E4T's encoder runs at every K-th denoising step (default 1)"
    )
    parser.add_argument("--weights", type=Path, help="a weights folder (default: the installed minifaces package's)")
    parser.add_argument("--grid", type=Path, help="save reference + E4T-5 images of each identity here")
    parser.add_argument(
        "--per-attribute",
        action="store_true",
        help="also print each method's margin per identity attribute (which attributes it carries)",
    )
    parser.add_argument(
        "--tune-timesteps",
        choices=list(TUNE_TIMESTEPS),
        default="uniform",
        help="a lever: E4T's tuning draws its timesteps over all of [0, T) (e4t tune's), above T/4, above T/2, "
        "below T/2, as T * sqrt(u), or one from each of a batch's equal slices of [0, T)",
    )
    parser.add_argument(
        "--tune-rate-schedule",
        choices=TUNE_RATE_SCHEDULES,
        default="constant",
        help="a lever: E4T's tuning rates held (e4t tune's), or falling or rising linearly over the steps "
        "around the same mean",
    )
    parser.add_argument(
        "--tune-optimizer",
        choices=("adamw", "warm"),
        default="adamw",
        help="a lever: E4T's tuning optimizer, AdamW (e4t tune's) or Adam whose second moments start from "
        "the domain's mean squared tuning gradients (bench/warm_preconditioner.py)",
    )
    parser.add_argument(
        "--warm-identities",
        type=int,
        default=32,
        help="training identities whose tuning gradients give --tune-optimizer warm its second moments",
    )
    add_additive_rank_arg(parser)
    parser.add_argument(
        "--additive-lr", type=float, help="E4T's tuning rate of the additive changes (default: the domain's)"
    )
    parser.add_argument("--json", action="store_true", help="print the scores as JSON instead of a table")
    add_loss_mask_arg(parser)
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    json_out = reserve_stdout_for_json(args.json)
    if args.tune_optimizer == "warm" and (args.tune_timesteps != "uniform" or args.tune_rate_schedule != "constant"):
        parser.error("--tune-optimizer warm measures the default tuning: use it without the other tuning levers")
    if args.tune_timesteps != "uniform":
        draw_tuning_timesteps(args.tune_timesteps)
    if args.tune_rate_schedule != "constant":
        schedule_tuning_rates(args.tune_rate_schedule)

    from e4t_minifaces import WEIGHTS, world
    from e4t_minifaces.evaluate import EvalSettings, World, chance_identity_score, evaluate

    w = World(args.weights or WEIGHTS)
    if args.tune_optimizer == "warm":
        from warm_preconditioner import precondition_tuning

        precondition_tuning(w, args.warm_identities)
    settings = EvalSettings(
        identities=args.identities,
        seeds_per_prompt=args.seeds_per_prompt,
        sampling_steps=args.sampling_steps,
        seed=args.seed,
        e4t_learning_rate=args.e4t_lr,
        e4t_lambda_emb=args.e4t_lambda_emb,
        e4t_offset_learning_rate=args.e4t_offset_lr,
        e4t_batch_size=args.e4t_batch_size,
        concept_precision=args.concept_precision,
        encoder_every=args.encoder_every,
        bias_learning_rate=args.bias_lr,
        additive_rank=args.additive_rank,
        additive_learning_rate=args.additive_lr,
        e4t_loss_mask=args.loss_mask,
    )
    methods = [m for m in args.methods.split(",") if m]
    grid_rows: dict = {}

    def keep(method, identity, images):
        if args.grid and method == "e4t-5":
            grid_rows[identity] = [world.portrait(identity)] + images[:: settings.seeds_per_prompt]

    scores = evaluate(w, methods, settings, on_images=keep)
    rows = [
        {
            "method": s.method,
            "own": s.identity,
            "margin": f"{s.margin:+.3f} ± {s.margin_stderr:.3f}",
            "swap": s.swap,
            "prompt fidelity": s.fidelity,
            "tune s": s.tune_seconds,
            "concept": human_size(s.concept_bytes),
        }
        for s in scores
    ]
    reader = w.reader_accuracy
    if args.json:
        print(
            json.dumps(
                {
                    "rows": [vars(s) for s in scores],
                    "reader_accuracy": reader,
                    "chance_identity": chance_identity_score(),
                }
            ),
            file=json_out,
        )
    else:
        print_table(
            rows,
            title=(
                f"{args.identities} held-out identities x {len(settings.backgrounds)} backgrounds x "
                f"{settings.seeds_per_prompt} seeds; chance identity score {chance_identity_score():.3f}; "
                f"reader accuracy on clean images: identity attributes "
                f"{min(reader[n] for n in world.IDENTITY_LABELS):.3f}-{max(reader[n] for n in world.IDENTITY_LABELS):.3f}, "
                f"background {reader['background']:.3f}"
            ),
        )
        if args.per_attribute:
            print_table(
                [
                    {"method": s.method, **{name: s.attribute_margin[name] for name in world.IDENTITY_CHOICES}}
                    for s in scores
                ],
                title="identity margin per attribute (0: the attribute does not follow the reference)",
            )
    if args.grid and grid_rows:
        save_grid(args.grid, list(grid_rows.values()))
        print(f"grid: {args.grid}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
