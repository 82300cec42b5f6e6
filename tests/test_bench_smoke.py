"""The benchmarks keep working as the code changes: each runs at a tiny size (timings are not checked)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script, *args):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--json"], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_gpu_script_runs_on_cpu_at_tiny_size():
    report = run("gpu_sd15.py", "--size", "tiny", "--batches", "1", "--tune-steps", "1", "--gen-steps", "2",
                 "--device", "cpu")
    phases = [row["phase"] for row in report["rows"]]
    assert any(p.startswith("tune") for p in phases) and any("generat" in p for p in phases)
    assert all(row["note"] == "ok" and row["seconds"] > 0 for row in report["rows"])
