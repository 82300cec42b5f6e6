"""Does the miniature world's base model obey its prompts? Per reader label, on a CPU.

Each value of a label (every background colour, every position, and the
appearance words of every identity attribute) is prompted with the same
seeds; the attribute reader says how often the image shows what was asked.
A model that ignores a word scores about that label's chance.

    python bench/minifaces_prompts.py                          # the shipped base model
    python bench/minifaces_prompts.py --base .cache/minifaces-build/base --seeds 8
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_args, apply_common_args, print_table, reserve_stdout_for_json  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="a base-model folder (default: the installed minifaces package's)")
    parser.add_argument("--reader", type=Path, help="the attribute reader (default: the installed package's)")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompted value")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--labels", help="comma-separated subset of the reader's labels")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_common_args(args)
    json_out = reserve_stdout_for_json(args.json)

    import torch
    from e4t_minifaces import WEIGHTS
    from e4t_minifaces.evaluate import EvalSettings, prompt_obedience
    from e4t_minifaces.reader import load_reader

    from e4tcli.models.loading import load_base_model

    base = load_base_model(str(args.base or WEIGHTS / "base"), torch.device("cpu"), torch.float32)
    reader, _ = load_reader(args.reader or WEIGHTS / "reader.safetensors")
    settings = EvalSettings(seeds_per_prompt=args.seeds, sampling_steps=args.sampling_steps)
    labels = args.labels.split(",") if args.labels else None
    try:
        rows = prompt_obedience(base, reader, settings, labels)
    except ValueError as error:
        parser.error(str(error))
    if args.json:
        print(json.dumps({"rows": [vars(r) for r in rows]}), file=json_out)
    else:
        title = (
            f"{args.seeds} images per prompted value, DDIM {args.sampling_steps} steps, guidance {settings.guidance}"
        )
        print_table([vars(r) for r in rows], title=title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
