"""The benchmarks keep working as the code changes: each runs at a tiny size (timings are not checked)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run(script, *args):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_gpu_script_runs_on_cpu_at_tiny_size():
    report = run(
        "gpu_sd15.py", "--size", "tiny", "--batches", "1", "--tune-steps", "1", "--gen-steps", "2", "--device", "cpu"
    )
    phases = [row["phase"] for row in report["rows"]]
    assert any(p.startswith("tune") for p in phases) and any("generat" in p for p in phases)
    assert all(row["note"] == "ok" and row["seconds"] > 0 for row in report["rows"])


@pytest.mark.slow
def test_pretrain_gpu_script_runs_on_cpu_at_tiny_size():
    report = run(
        "gpu_pretrain.py",
        "--size",
        "tiny",
        "--configs",
        "fp32:paper:-,fp32:lowrank:ckpt:cache",
        "--batch-size",
        "2",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--threads",
        "1",
    )
    paper, lowrank = report["rows"]
    assert paper["note"] == lowrank["note"] == "ok"
    assert all(row["s_per_step"] > 0 and row["final_loss"] > 0 for row in (paper, lowrank))
    # the paper's d x d offsets train (and store, with their AdamW state) more than rank-r factors
    assert paper["trainable_m"] > lowrank["trainable_m"] and paper["checkpoint_mb"] > lowrank["checkpoint_mb"]


@pytest.mark.slow
def test_minifaces_quality_runs_every_kind_of_method():
    report = run(
        "minifaces_quality.py",
        "--methods",
        "base,e4t-1,e4t-encoder-1,e4t-biases-1,ti-2,dreambooth-2",
        "--identities",
        "2",
        "--seeds-per-prompt",
        "1",
        "--sampling-steps",
        "4",
        "--threads",
        "1",
    )
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["base", "e4t-1", "e4t-encoder-1", "e4t-biases-1", "ti-2", "dreambooth-2"]
    for row in rows.values():
        assert 0.0 <= row["identity"] <= 1.0 and 0.0 <= row["fidelity"] <= 1.0 and 0.0 <= row["swap"] <= 1.0
        assert -1.0 <= row["margin"] <= 1.0 and len(row["per_identity_margin"]) == 2
    assert abs(rows["base"]["margin"]) < 1e-12 and rows["base"]["swap"] == 0.5  # ignores the reference
    assert rows["base"]["concept_bytes"] == 0
    # a word embedding < an E4T concept (encoder + offset factors) < a whole UNet
    assert 0 < rows["ti-2"]["concept_bytes"] < rows["e4t-1"]["concept_bytes"] < rows["dreambooth-2"]["concept_bytes"]
    assert all(rows[m]["tune_seconds"] > 0 for m in ("e4t-1", "ti-2", "dreambooth-2"))
    # the domain tunes the bias changes, and they count; the encoder-only method leaves them out
    assert (
        rows["e4t-encoder-1"]["concept_bytes"] < rows["e4t-1"]["concept_bytes"] == rows["e4t-biases-1"]["concept_bytes"]
    )


@pytest.mark.slow
def test_minifaces_tune_time_times_every_method_in_each_round():
    report = run("minifaces_tune_time.py", "--steps", "1", "--dreambooth-steps", "2", "--rounds", "2", "--threads", "1")
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["e4t-1", "e4t-no-additive-1", "dreambooth-2"]
    assert all(len(seconds) == 2 and min(seconds) > 0 for seconds in report["seconds"].values())
    for method in ("e4t", "e4t-no-additive"):  # each ratio is the median of the rounds' own ratios
        ratios = [a / b for a, b in zip(report["seconds"][method], report["seconds"]["dreambooth"])]
        assert rows[f"{method}-1"]["ratio to dreambooth"] == pytest.approx(statistics.median(ratios))
        low, high = (float(q) for q in rows[f"{method}-1"]["quartiles"].split("-"))
        first, second = sorted(ratios)  # two rounds: the quartiles lie a quarter of the way in from each
        assert low == pytest.approx(first + (second - first) / 4, abs=0.006)
        assert high == pytest.approx(second - (second - first) / 4, abs=0.006)


TINY_CURVE = (
    *("--steps", "2", "--evaluate-at", "1", "--portraits", "8", "--batch-size", "2"),
    *("--identities", "2", "--seeds-per-prompt", "1", "--sampling-steps", "2", "--methods", "e4t-0", "--threads", "1"),
)
"""Two pre-training steps on 8 portraits, checkpoints 1 and 2 scored on 2 identities."""


@pytest.mark.slow
def test_minifaces_curve_pretrains_with_its_levers_and_scores_each_checkpoint(tmp_path):
    report = run(
        "minifaces_curve.py",
        "--work",
        str(tmp_path),
        *TINY_CURVE,
        "--timestep-bias",
        "--contrastive",
        "1",
        "--frozen-offsets",
        "--pretrain-bias-lr",
        "1e-3",
    )
    assert [(row["step"], row["portraits seen"], row["method"]) for row in report["rows"]] == [
        (1, 2, "e4t-0"),
        (2, 4, "e4t-0"),
    ]
    assert all(
        len(row["per attribute (head skin eyes spacing mouth hair colour)"].split()) == 7 for row in report["rows"]
    )
    from e4tcli.io.checkpoint import load_checkpoint

    first, second = (load_checkpoint(tmp_path / "run" / f"checkpoint-000000{step}").tensors for step in (1, 2))
    offsets = [name for name in first if name.startswith("offsets.")]
    encoder = [name for name in first if name.startswith("encoder.")]
    assert offsets and all(torch.equal(first[name], second[name]) for name in offsets)  # frozen
    assert any(not torch.equal(first[name], second[name]) for name in encoder)  # the encoder trains
    biases = [name for name in first if name.startswith("biases.")]
    assert biases and any(not torch.equal(first[name], second[name]) for name in biases)  # pre-trained too


def test_minifaces_meta_trains_the_domain_on_training_identities_and_resumes(tmp_path):
    from e4t_minifaces import WEIGHTS, world

    from e4tcli.io.checkpoint import load_checkpoint

    tiny = ("--views", "2", "--inner-steps", "1", "--save-at", "1", "--face-only", "--threads", "1")
    still = run("minifaces_meta.py", "--work", str(tmp_path), "--steps", "1", "--meta-lr", "0", *tiny)
    resumed = run("minifaces_meta.py", "--work", str(tmp_path), "--steps", "2", *tiny)
    assert [record["step"] for record in still["steps"] + resumed["steps"]] == [1, 2]  # continues after step 1
    logged = [json.loads(line)["step"] for line in (tmp_path / "meta.log").read_text().splitlines()]
    assert logged == [1, 2]
    drawn = [world.Identity.from_index(r["identity"]) for r in still["steps"] + resumed["steps"]]
    assert not any(identity.held_out for identity in drawn)

    shipped = load_checkpoint(WEIGHTS / "checkpoint").tensors
    step1, step2 = (load_checkpoint(tmp_path / f"weights-{step}" / "checkpoint").tensors for step in (1, 2))
    assert step1.keys() == shipped.keys() == step2.keys()
    assert all(torch.equal(step1[name], shipped[name]) for name in shipped)  # the domain's, not the tuned copy's
    for part in ("encoder.", "offsets."):
        names = [name for name in shipped if name.startswith(part)]
        assert any(not torch.equal(step2[name], step1[name]) for name in names)  # meta-trained


def test_minifaces_quality_tunes_with_the_warm_optimizer():
    report = run(
        "minifaces_quality.py",
        *("--methods", "e4t-1", "--identities", "2", "--seeds-per-prompt", "1", "--sampling-steps", "2"),
        *("--tune-optimizer", "warm", "--warm-identities", "1", "--threads", "1"),
    )
    assert [row["method"] for row in report["rows"]] == ["e4t-1"] and report["rows"][0]["tune_seconds"] > 0


@pytest.mark.slow
def test_minifaces_word_gain_measures_every_attribute_and_timestep_range():
    report = run("minifaces_word_gain.py", "--identities", "2", "--samples", "2", "--threads", "1")
    from e4t_minifaces import world

    for gains in (report["over_none"], report["over_wrong"]):
        assert set(gains) == set(world.IDENTITY_CHOICES)
        assert all(len(by_range) == 4 for by_range in gains.values())
    # the base model binds head-shape words: naming a wrong head shape costs more than naming the right one
    assert sum(report["over_wrong"]["head"].values()) > 0


def warm_adam():
    sys.path.insert(0, str(ROOT / "bench"))
    from warm_preconditioner import WarmAdam

    return WarmAdam


def test_warm_adam_without_second_moments_steps_as_adamw_does():
    WarmAdam = warm_adam()
    torch.manual_seed(0)
    start = torch.randn(5)
    ours, theirs = (start.clone().requires_grad_(True) for _ in range(2))
    warm = WarmAdam([{"params": [ours], "lr": 0.1, "betas": (0.9, 0.999), "weight_decay": 0.01, "eps": 1e-8}], {})
    adamw = torch.optim.AdamW([theirs], lr=0.1, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    for _ in range(4):
        for parameter, optimizer in ((ours, warm), (theirs, adamw)):
            optimizer.zero_grad()
            (parameter**3).sum().backward()
            optimizer.step()
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_warm_adam_moves_a_parameter_by_its_gradient_against_the_usual_one():
    WarmAdam = warm_adam()
    usual, quiet = (torch.zeros(3, requires_grad=True) for _ in range(2))
    moments = {id(usual): torch.full((3,), 4.0), id(quiet): torch.full((3,), 4.0)}
    optimizer = WarmAdam([{"params": [usual, quiet], "lr": 0.1, "betas": (0.9, 0.999), "weight_decay": 0.0}], moments)
    usual.grad, quiet.grad = torch.full((3,), 2.0), torch.full((3,), 0.2)  # as large as usual, a tenth of it
    optimizer.step()
    assert torch.allclose(usual.detach(), torch.full((3,), -0.1), rtol=1e-3)  # Adam's first step: -lr
    assert torch.allclose(quiet.detach(), torch.full((3,), -0.01), rtol=1e-3)  # Adam would also move it by -lr


@pytest.mark.parametrize("lever, low, high", [("below-half", 0, 500), ("above-half", 500, 1000), ("uniform", 0, 1000)])
def test_tuning_timestep_lever_draws_over_its_range(monkeypatch, lever, low, high):
    from types import SimpleNamespace

    import e4tcli.training.tune as tune

    sys.path.insert(0, str(ROOT / "bench"))
    from minifaces_quality import draw_tuning_timesteps

    drawn = []
    monkeypatch.setattr(tune, "training_step", lambda model, batch, *args: drawn.append(batch.timesteps))
    draw_tuning_timesteps(lever)
    batch = SimpleNamespace(latents=torch.zeros(256, 4, 2, 2), timesteps=None)
    scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    tune.training_step(None, batch, scheduler, 0.0, 0.0, torch.Generator().manual_seed(0))
    (timesteps,) = drawn
    assert low <= int(timesteps.min()) and int(timesteps.max()) < high
    assert int(timesteps.max()) - int(timesteps.min()) > 0.9 * (high - low)  # the whole range, not a corner
