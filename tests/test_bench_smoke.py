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


def test_pretrain_gpu_script_runs_on_cpu_at_tiny_size():
    report = run("gpu_pretrain.py", "--size", "tiny", "--configs", "fp32:paper:-,fp32:lowrank:ckpt:cache",
                 "--batch-size", "2", "--steps", "3", "--device", "cpu", "--threads", "1")
    paper, lowrank = report["rows"]
    assert paper["note"] == lowrank["note"] == "ok"
    assert all(row["s_per_step"] > 0 and row["final_loss"] > 0 for row in (paper, lowrank))
    # the paper's d x d offsets train (and store, with their AdamW state) more than rank-r factors
    assert paper["trainable_m"] > lowrank["trainable_m"] and paper["checkpoint_mb"] > lowrank["checkpoint_mb"]


def test_minifaces_quality_runs_every_kind_of_method():
    report = run("minifaces_quality.py", "--methods", "base,e4t-1,ti-2,dreambooth-2", "--identities", "1",
                 "--seeds-per-prompt", "1", "--sampling-steps", "4", "--threads", "1")
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["base", "e4t-1", "ti-2", "dreambooth-2"]
    assert all(0.0 <= row["identity"] <= 1.0 and 0.0 <= row["fidelity"] <= 1.0 for row in rows.values())
    assert rows["base"]["concept_bytes"] == 0
    # a word embedding < an E4T concept (encoder + offset factors) < a whole UNet
    assert 0 < rows["ti-2"]["concept_bytes"] < rows["e4t-1"]["concept_bytes"] < rows["dreambooth-2"]["concept_bytes"]
    assert all(rows[m]["tune_seconds"] > 0 for m in ("e4t-1", "ti-2", "dreambooth-2"))


def test_minifaces_prompts_shows_the_shipped_base_obeys_background_words():
    """The issue's "the base model must follow its prompts": every background colour, read back by the reader."""
    report = run("minifaces_prompts.py", "--labels", "background,eyes", "--seeds", "1", "--sampling-steps", "20",
                 "--threads", "1")
    rows = {row["what"]: row for row in report["rows"]}
    assert list(rows) == ["background", "eyes"]
    assert rows["background"]["chance"] == 1 / 8 and rows["eyes"]["chance"] == 1 / 4
    assert rows["background"]["obeyed"] >= 7 / 8


def test_minifaces_prompts_rejects_an_unknown_label():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "minifaces_prompts.py"), "--labels", "backgruond"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode != 0
    assert "backgruond" in result.stderr and "choose from" in result.stderr
