"""Start-up costs: how long the CLI takes to answer, and where a cold `e4t generate` spends its time.

What it measures, each in a fresh Python process (nothing cached in memory;
the operating system's file cache is warm after the first run, as it is for a
user who runs e4t twice):

- ``e4t --help`` and a TAB completion (``_E4T_COMPLETE=complete_bash``), the
  median wall time of ``--runs`` runs of the installed ``e4t`` command;
- ``e4t generate`` of one image on minifaces (``--steps``, the tuning
  resolution), the median wall time of the command, and the same work done
  step by step in one process: imports (torch, diffusers, e4t's API), loading
  (concept, base model, pipeline), sampling (the denoising loop and the VAE),
  writing the PNG.

The concept is tuned once (``e4t tune`` on the minifaces example portrait,
5 steps) into a temporary folder.

Why: the CLI must stay instant (TARGET: ``--help`` and completion under
0.25 s), and a user waiting for one image should know what they wait for.

Usage: python bench/startup.py [--runs 5] [--steps 25] [--json]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median, print_table, reserve_stdout_for_json  # noqa: E402

PHASES = r"""
import json, sys, time
start = time.perf_counter()
marks = {}
import torch, diffusers
from e4tcli import api
from e4tcli.device import choose_placement
from e4tcli.pipeline import SamplingSettings, build_pipeline, generate_images
marks["imports"] = time.perf_counter()
model, concept = api.load_concept_model(sys.argv[1], None, choose_placement("cpu"))
pipe = build_pipeline(model)
marks["loading"] = time.perf_counter()
resolution = concept.info["tuning"]["resolution"]
settings = SamplingSettings(prompt="S* on a beach", steps=int(sys.argv[2]), height=resolution, width=resolution)
(image,) = generate_images(model, settings, pipe)
marks["sampling"] = time.perf_counter()
image.save(sys.argv[3])
marks["writing"] = time.perf_counter()
previous, seconds = start, {}
for name, at in marks.items():
    seconds[name], previous = at - previous, at
print(json.dumps(seconds))
"""


def e4t_command() -> list[str]:
    found = shutil.which("e4t", path=os.path.dirname(sys.executable)) or shutil.which("e4t")
    return [found] if found else [sys.executable, "-m", "e4tcli"]


def timed(command: list[str], env=None) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    json_out = reserve_stdout_for_json(args.json)
    from e4t_minifaces import EXAMPLES

    e4t = e4t_command()
    completion = dict(os.environ, _E4T_COMPLETE="complete_bash", COMP_WORDS="e4t gen", COMP_CWORD="1")
    rows = [
        {"what": "e4t --help", "seconds": median([timed(e4t + ["--help"]) for _ in range(args.runs)])},
        {"what": "TAB completion", "seconds": median([timed(e4t, completion) for _ in range(args.runs)])},
    ]
    with tempfile.TemporaryDirectory() as tmp:
        concept = Path(tmp) / "mira.safetensors"
        portrait = EXAMPLES / "mira.png"
        subprocess.run(
            e4t + ["tune", str(portrait), "--domain", "minifaces", "--out", str(concept)],
            check=True,
            capture_output=True,
        )
        generate = e4t + ["generate", str(concept), "S* on a beach", "--steps", str(args.steps), "--force"]
        generate += ["--out", str(Path(tmp) / "out")]
        rows.append({"what": "e4t generate, 1 image", "seconds": median([timed(generate) for _ in range(args.runs)])})
        phases = []
        for _ in range(args.runs):
            done = subprocess.run(
                [sys.executable, "-c", PHASES, str(concept), str(args.steps), str(Path(tmp) / "one.png")],
                check=True,
                capture_output=True,
                text=True,
            )
            phases.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for name in phases[0]:
        rows.append({"what": f"  {name}", "seconds": median([p[name] for p in phases])})
    if args.json:
        print(json.dumps({"runs": args.runs, "steps": args.steps, "rows": rows}, indent=2), file=json_out)
        return
    print(f"fresh processes, median of {args.runs} runs; generate: minifaces, {args.steps} steps, 1 image, CPU")
    print_table(rows)
    for row in rows[:2]:
        verdict = "OK" if row["seconds"] < 0.25 else "MISSED"
        print(f"target {row['what']} < 0.25 s: {row['seconds']:.3f} s {verdict}")


if __name__ == "__main__":
    main()
