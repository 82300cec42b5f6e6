"""Does `e4t generate`'s peak memory stay flat as the number of images grows? On a CPU.

Tunes one minifaces concept, then runs `e4t generate` in fresh processes
for -n 4 and -n 128 (the default batch size) and -n 128 --batch-size 128
(every image at once, as e4t did before it generated in batches), each
`--repeats` times in turn, and prints each one's peak resident memory
(VmHWM) with its spread.

    python bench/generate_memory.py                 # about 4 minutes on 2 cores
    python bench/generate_memory.py --repeats 3 --json
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, reserve_stdout_for_json  # noqa: E402


def peak_of(args: list[str], report: Path) -> float:
    script = (
        "import sys\n"
        "from e4tcli.cli import main\n"
        "from e4tcli.memory import peak_rss_mb\n"
        "report, sys.argv = sys.argv[1], ['e4t', *sys.argv[2:]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as done:\n"
        "    if done.code:\n"
        "        raise\n"
        "open(report, 'w').write(str(peak_rss_mb()))\n"
    )
    subprocess.run([sys.executable, "-c", script, str(report), *args], check=True, capture_output=True, text=True)
    return float(report.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    json_out = reserve_stdout_for_json(args.json)

    from e4t_minifaces import EXAMPLES

    cases = {
        "-n 4": ["-n", "4"],
        "-n 128": ["-n", "128"],
        "-n 128 --batch-size 128": ["-n", "128", "--batch-size", "128"],
    }
    peaks = {name: [] for name in cases}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        concept = tmp / "mira.safetensors"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "e4tcli",
                "tune",
                str(EXAMPLES / "mira.png"),
                "--domain",
                "minifaces",
                "--out",
                str(concept),
            ],
            check=True,
            capture_output=True,
        )
        for repeat in range(args.repeats):
            for name, flags in cases.items():
                out = tmp / f"out-{repeat}-{len(peaks[name])}-{flags[1]}"
                peaks[name].append(
                    peak_of(
                        [
                            "generate",
                            str(concept),
                            "a S* on a red background",
                            *flags,
                            "--steps",
                            str(args.steps),
                            "--out",
                            str(out),
                        ],
                        tmp / "peak",
                    )
                )
    reference = statistics.mean(peaks["-n 4"])
    rows = [
        {
            "run": name,
            "peak RSS MB": round(statistics.mean(values), 1),
            "spread MB": round(max(values) - min(values), 1),
            "vs -n 4": round(statistics.mean(values) / reference, 3),
        }
        for name, values in peaks.items()
    ]
    if args.json:
        print(json.dumps({"rows": rows, "peaks": peaks}), file=json_out)
    else:
        print_table(
            rows, title=f"e4t generate on minifaces, {args.steps} steps, {args.repeats} runs each (fresh processes)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
