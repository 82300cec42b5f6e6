"""Pre-training that never loses a day: resume exactness, NaN stop, signals, recipes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from e4tcli.cli import app

runner = CliRunner()


def pretrain(args):
    result = runner.invoke(app, ["pretrain", *args, "--json"])
    return result


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def weights(checkpoint):
    return load_file(str(checkpoint / "model.safetensors"))


def test_resumed_run_repeats_the_uninterrupted_one_exactly(pretrain_args, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert pretrain([*pretrain_args, "--out", str(straight), "--steps", "4"]).exit_code == 0
    assert (
        pretrain(
            [*pretrain_args, "--out", str(split), "--steps", "2", "--checkpoint-every", "1", "--keep-last", "1"]
        ).exit_code
        == 0
    )
    assert sorted(p.name for p in split.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-0000002"]
    result = pretrain([*pretrain_args, "--out", str(split), "--steps", "4", "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert losses(split) == losses(straight)
    assert len(losses(split)) == 4
    a, b = weights(straight / "checkpoint-0000004"), weights(split / "checkpoint-0000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    optimizer_a = load_file(str(straight / "checkpoint-0000004" / "optimizer.safetensors"))
    optimizer_b = load_file(str(split / "checkpoint-0000004" / "optimizer.safetensors"))
    assert all(torch.equal(optimizer_a[k], optimizer_b[k]) for k in optimizer_a)


def test_8bit_adam_checkpoints_and_resumes_exactly(pretrain_args, tmp_path):
    """bitsandbytes keeps its 8-bit state in nested dicts; they survive the safetensors checkpoint."""
    pytest.importorskip("bitsandbytes")
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = [*pretrain_args, "--optimizer", "adamw8bit", "--lr", "1e-3"]
    for run, extra in ((straight, ["--steps", "3"]), (split, ["--steps", "2"])):
        result = pretrain([*args, "--out", str(run), *extra])
        assert result.exit_code == 0, result.output
    result = pretrain([*args, "--out", str(split), "--steps", "3", "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert losses(split) == losses(straight)
    a, b = weights(straight / "checkpoint-0000003"), weights(split / "checkpoint-0000003")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = load_file(str(split / "checkpoint-0000003" / "optimizer.safetensors"))
    assert any(t.dtype == torch.uint8 for t in state.values()), "no 8-bit optimizer state was saved"


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(pretrain_args, tmp_path):
    run = tmp_path / "nan"
    result = pretrain([*pretrain_args, "--out", str(run), "--steps", "6", "--checkpoint-every", "1", "--lr", "1e30"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "non-finite at step" in line
    failed_step = int(line.split("at step ")[1].split(";")[0])
    assert failed_step >= 2
    last_good = run / f"checkpoint-{failed_step - 1:07d}"
    assert str(last_good) in line
    assert (run / "latest").read_text().strip() == last_good.name
    assert all(torch.isfinite(t).all() for t in weights(last_good).values())
    assert not (run / f"checkpoint-{failed_step:07d}").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "no temporary leftovers"


def test_recipe_file_with_flag_overrides_is_saved(pretrain_args, tmp_path, tiny_sd, tiny_backbone, photo_folder):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"domain: cats\ndata: {photo_folder}\nbase_model: {tiny_sd}\nbackbone: {tiny_backbone}\n"
        "steps: 3\nbatch_size: 2\nresolution: 64\nencoder_hidden_dim: 32\nlearning_rate: 0.001\ndevice: cpu\n"
    )
    run = tmp_path / "run"
    result = pretrain(["--config", str(recipe), "--out", str(run), "--steps", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["steps"] == 1
    config = json.loads((run / "checkpoint-0000001" / "config.json").read_text())
    assert config["training"]["learning_rate"] == 0.001 and config["training"]["steps"] == 1
    import yaml

    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["steps"] == 1 and saved["learning_rate"] == 0.001 and saved["domain"] == "cats"

    recipe.write_text("domain: cats\nstepz: 3\n")
    result = pretrain(["--config", str(recipe), "--out", str(run)])
    assert result.exit_code == 2 and "unknown recipe key 'stepz'" in result.stderr
    recipe.write_text("steps: many\n")
    result = pretrain(["--config", str(recipe), "--out", str(run)])
    assert result.exit_code == 2 and "'steps'" in result.stderr and "must be int" in result.stderr


def test_validation_grid_is_written(pretrain_args, tmp_path):
    run = tmp_path / "val"
    result = pretrain([*pretrain_args, "--out", str(run), "--steps", "2", "--validate-every", "2"])
    assert result.exit_code == 0, result.output
    from PIL import Image

    grid = Image.open(run / "validation" / "step-0000002.png")
    assert grid.size[0] >= 128 and grid.size[1] >= 64  # held-out image and its generation, side by side


def test_a_refused_resume_leaves_the_runs_recipe_as_it_was(pretrain_args, tmp_path):
    run = tmp_path / "run"
    assert pretrain([*pretrain_args, "--out", str(run), "--steps", "1"]).exit_code == 0
    recipe = (run / "recipe.yaml").read_text()
    assert "encoder_hidden_dim: 32" in recipe
    other = list(pretrain_args)
    other[other.index("--encoder-hidden-dim") + 1] = "16"
    result = pretrain([*other, "--out", str(run), "--steps", "2", "--resume", "latest"])
    assert result.exit_code == 2 and "its encoder differs from this run's" in result.stderr, result.output
    assert (run / "recipe.yaml").read_text() == recipe


def test_resume_needs_something_to_resume(pretrain_args, tmp_path):
    result = pretrain([*pretrain_args, "--out", str(tmp_path / "empty"), "--steps", "1", "--resume", "latest"])
    assert result.exit_code == 2 and "nothing to resume" in result.stderr


def run_cli(args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "e4tcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop, extra, whole_group",
    [
        (signal.SIGTERM, [], False),
        # Ctrl-C in a terminal signals the whole process group, data-loader workers included
        (signal.SIGINT, ["--workers", "2", "--gradient-accumulation", "2"], True),
    ],
)
def test_stop_signal_saves_a_resumable_checkpoint(pretrain_args, tmp_path, stop, extra, whole_group):
    run = tmp_path / "interrupted"
    process = run_cli(
        ["pretrain", *pretrain_args, "--out", str(run), "--steps", "500", *extra, "--json"], start_new_session=True
    )
    log = run / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    if whole_group:
        os.killpg(process.pid, stop)
    else:
        process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + stop, stderr  # 130 for SIGINT, 143 for SIGTERM
    assert "resumable checkpoint saved" in stderr and "--resume latest" in stderr
    step = int((run / "latest").read_text().strip().split("-")[1])
    assert 2 <= step < 500
    assert len(losses(run)) == step
    result = pretrain([*pretrain_args, *extra, "--out", str(run), "--steps", str(step + 1), "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert len(losses(run)) == step + 1


def test_workers_cache_and_ema(pretrain_args, tmp_path):
    """Decoding in 2 workers or from the feature cache trains exactly like decoding inline; EMA is saved."""
    inline, workers, cached = tmp_path / "inline", tmp_path / "workers", tmp_path / "cached"
    common = [*pretrain_args, "--steps", "2"]
    assert pretrain([*common, "--out", str(inline)]).exit_code == 0
    assert pretrain([*common, "--out", str(workers), "--workers", "2"]).exit_code == 0
    result = pretrain([*common, "--out", str(cached), "--cache-features", "--ema-decay", "0.5"])
    assert result.exit_code == 0, result.output
    assert losses(workers) == losses(inline)
    assert losses(cached) == pytest.approx(losses(inline), rel=1e-6)
    assert (cached / "cache" / "cache.json").is_file()
    final = cached / "checkpoint-0000002"
    raw, ema = weights(final), load_file(str(final / "ema.safetensors"))
    assert raw.keys() == ema.keys()
    moved = [k for k in raw if not torch.equal(raw[k], ema[k])]
    assert moved, "the EMA lags behind the raw weights"
    from e4tcli.io.checkpoint import load_checkpoint

    assert all(torch.equal(load_checkpoint(cached).tensors[k], ema[k]) for k in ema)


def test_unreadable_images_found_by_workers_are_counted(pretrain_args, tmp_path, photo_folder):
    """A file that fails to decode inside a DataLoader worker is reported like one found inline."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(photo_folder / "chelsea.png", data / "chelsea.png")
    shutil.copy(photo_folder / "coffee.png", data / "truncated.png")
    raw = (data / "truncated.png").read_bytes()
    (data / "truncated.png").write_bytes(raw[: len(raw) // 2])
    args = [a if a != str(photo_folder) else str(data) for a in pretrain_args] + ["--steps", "3"]
    counts = {}
    for workers in ("0", "2"):
        result = pretrain([*args, "--out", str(tmp_path / f"run{workers}"), "--workers", workers])
        assert result.exit_code == 0, result.output
        counts[workers] = json.loads(result.stdout)["skipped_images"]
    assert counts == {"0": 1, "2": 1}
