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

from common import add_common_args, apply_common_args, print_table, reserve_stdout_for_json  # noqa: E402


def zero_unet_features() -> None:
    """The encoder reads the reference alone: its input from the noisy latent is zeroed (a diagnosis:
    in pre-training that latent is the reference itself, a possible shortcut)."""
    import torch

    from e4tcli.models.encoder import E4TEncoder

    forward = E4TEncoder.forward
    E4TEncoder.forward = lambda self, image, unet: forward(self, image, torch.zeros_like(unet))


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
    parser.add_argument("--json", action="store_true", help="print the scores as JSON instead of a table")
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
        identities=args.identities, seeds_per_prompt=args.seeds_per_prompt, sampling_steps=args.sampling_steps
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
                }
            )
        (args.work / "curve.json").write_text(json.dumps({"train_seconds": train_seconds, "rows": rows}, indent=1))
    if args.json:
        print(json.dumps({"train_seconds": train_seconds, "rows": rows}), file=json_out)
        return 0
    print_table(
        rows,
        title=f"{args.portraits} portraits, {args.identities} held-out identities, trained {train_seconds / 60:.1f} min",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
