"""Tuning time on the miniature world: E4T against DreamBooth, measured side by side.

The quality bench times each method over all identities, one method after the other, so a machine
that slows down between two methods moves their ratio. Here the methods take turns on each held-out
identity (the order rotates every round), only the tuning is timed (as the quality bench times it:
from the reference portrait to the tuned weights), and each method's ratio to DreamBooth-N is the median
of the per-round ratios, with their quartiles as its spread. TARGET (the encoder-identity issue): E4T-5
tunes within 1.5x DreamBooth-5's time.

    python bench/minifaces_tune_time.py --threads 1                        # e4t-5, e4t-5 without additive changes, dreambooth-5
    python bench/minifaces_tune_time.py --steps 15 --dreambooth-steps 50 --rounds 8 --threads 1
"""

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_args, apply_common_args, print_table, reserve_stdout_for_json  # noqa: E402

METHODS = ("e4t", "e4t-no-additive", "dreambooth")


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, middle, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, middle, high


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="tuning steps of every method (default 5)")
    parser.add_argument("--dreambooth-steps", type=int, help="DreamBooth's tuning steps (default: --steps)")
    parser.add_argument("--rounds", type=int, default=16, help="held-out identities, one round each (default 16)")
    parser.add_argument("--seed", type=int, default=1234, help="draws the held-out identities")
    parser.add_argument("--json", action="store_true")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    json_out = reserve_stdout_for_json(args.json)
    steps = {"e4t": args.steps, "e4t-no-additive": args.steps, "dreambooth": args.dreambooth_steps or args.steps}

    from e4t_minifaces import WEIGHTS
    from e4t_minifaces.evaluate import EvalSettings, World, held_out_identities, tuned_concept, tuned_unet

    w = World(WEIGHTS)
    settings = EvalSettings(identities=args.rounds, seed=args.seed)
    without_additive = replace(settings, additive_rank=0)
    tune = {
        "e4t": lambda identity: tuned_concept(w, identity, settings, steps["e4t"])[1],
        "e4t-no-additive": lambda identity: tuned_concept(w, identity, without_additive, steps["e4t-no-additive"])[1],
        "dreambooth": lambda identity: tuned_unet(w, identity, steps["dreambooth"])[1],
    }
    identities = held_out_identities(args.rounds, args.seed)
    for method in METHODS:  # warm-up: first calls pay for lazy imports and allocations
        tune[method](identities[0])
    seconds: dict[str, list[float]] = {method: [] for method in METHODS}
    for round_number, identity in enumerate(identities):
        order = METHODS[round_number % len(METHODS) :] + METHODS[: round_number % len(METHODS)]
        for method in order:
            seconds[method].append(tune[method](identity))

    rows = []
    for method in METHODS:
        ratios = [a / b for a, b in zip(seconds[method], seconds["dreambooth"])]
        low, ratio, high = quartiles(ratios)
        rows.append(
            {
                "method": f"{method}-{steps[method]}",
                "median s": statistics.median(seconds[method]),
                "ratio to dreambooth": ratio,
                "quartiles": f"{low:.2f}-{high:.2f}",
            }
        )
    if args.json:
        print(json.dumps({"rows": rows, "seconds": seconds}), file=json_out)
    else:
        print_table(
            rows,
            title=f"tuning time, {args.rounds} rounds (one held-out identity each, the order rotating)",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
