"""The CLI must start without torch: --help and shell completion run on every keystroke."""

import os
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "diffusers", "transformers", "accelerate")

PROBE = """
import sys
sys.argv = ["e4t", *{args!r}]
from e4tcli.cli import main
try:
    main()
except SystemExit:
    pass
sys.stderr.write("LOADED:" + ",".join(m for m in {heavy!r} if m in sys.modules) + "\\n")
"""


def run_cli(args, env=None):
    code = PROBE.format(args=list(args), heavy=HEAVY)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    loaded = result.stderr.strip().splitlines()[-1]
    return result, loaded.removeprefix("LOADED:")


def test_help_imports_nothing_heavy():
    result, loaded = run_cli(["--help"])
    assert "domains" in result.stdout
    assert loaded == ""


def test_domains_listing_imports_nothing_heavy():
    result, loaded = run_cli(["domains"])
    assert "cats" in result.stdout
    assert loaded == ""


def test_every_command_help_imports_nothing_heavy():
    from typer.main import get_command

    from e4tcli.cli import app

    for name in get_command(app).commands:
        result, loaded = run_cli([name, "--help"])
        assert result.stdout.startswith("Usage: e4t " + name)
        assert loaded == "", f"'e4t {name} --help' imported {loaded}"


def test_completion_imports_nothing_heavy():
    env = {"_E4T_COMPLETE": "complete_bash", "COMP_WORDS": "e4t domains show ca", "COMP_CWORD": "3"}
    result, loaded = run_cli([], env=env)
    assert result.stdout.split() == ["cats"]
    assert loaded == ""


def median_seconds(command, repeat=5):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    base = median_seconds([sys.executable, "-c", "pass"])
    cli = median_seconds([sys.executable, "-m", "e4tcli", "--help"])
    print(f"python -c pass: {base * 1000:.0f} ms   e4t --help: {cli * 1000:.0f} ms   ratio {cli / base:.1f}x")
