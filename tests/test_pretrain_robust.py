"""Pre-training that never loses a day: resume exactness, NaN stop, signals, DDP equivalence, recipes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from e4tcli.cli import app

runner = CliRunner()


@pytest.fixture
def base_args(tiny_sd, tiny_backbone, photo_folder):
    return [
        "--domain",
        "cats",
        "--data",
        str(photo_folder),
        "--base-model",
        str(tiny_sd),
        "--backbone",
        str(tiny_backbone),
        "--batch-size",
        "2",
        "--resolution",
        "64",
        "--encoder-hidden-dim",
        "32",
        "--device",
        "cpu",
    ]


def pretrain(args):
    result = runner.invoke(app, ["pretrain", *args, "--json"])
    return result


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def weights(checkpoint):
    return load_file(str(checkpoint / "model.safetensors"))


def test_resumed_run_repeats_the_uninterrupted_one_exactly(base_args, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert pretrain([*base_args, "--out", str(straight), "--steps", "4"]).exit_code == 0
    assert (
        pretrain(
            [*base_args, "--out", str(split), "--steps", "2", "--checkpoint-every", "1", "--keep-last", "1"]
        ).exit_code
        == 0
    )
    assert sorted(p.name for p in split.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-0000002"]
    result = pretrain([*base_args, "--out", str(split), "--steps", "4", "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert losses(split) == losses(straight)
    assert len(losses(split)) == 4
    a, b = weights(straight / "checkpoint-0000004"), weights(split / "checkpoint-0000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    optimizer_a = load_file(str(straight / "checkpoint-0000004" / "optimizer.safetensors"))
    optimizer_b = load_file(str(split / "checkpoint-0000004" / "optimizer.safetensors"))
    assert all(torch.equal(optimizer_a[k], optimizer_b[k]) for k in optimizer_a)


def test_8bit_adam_checkpoints_and_resumes_exactly(base_args, tmp_path):
    """bitsandbytes keeps its 8-bit state in nested dicts; they survive the safetensors checkpoint."""
    pytest.importorskip("bitsandbytes")
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = [*base_args, "--optimizer", "adamw8bit", "--lr", "1e-3"]
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


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(base_args, tmp_path):
    run = tmp_path / "nan"
    result = pretrain([*base_args, "--out", str(run), "--steps", "6", "--checkpoint-every", "1", "--lr", "1e30"])
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


def test_recipe_file_with_flag_overrides_is_saved(base_args, tmp_path, tiny_sd, tiny_backbone, photo_folder):
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


def test_validation_grid_is_written(base_args, tmp_path):
    run = tmp_path / "val"
    result = pretrain([*base_args, "--out", str(run), "--steps", "2", "--validate-every", "2"])
    assert result.exit_code == 0, result.output
    from PIL import Image

    grid = Image.open(run / "validation" / "step-0000002.png")
    assert grid.size[0] >= 128 and grid.size[1] >= 64  # held-out image and its generation, side by side


def test_resume_needs_something_to_resume(base_args, tmp_path):
    result = pretrain([*base_args, "--out", str(tmp_path / "empty"), "--steps", "1", "--resume", "latest"])
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
def test_stop_signal_saves_a_resumable_checkpoint(base_args, tmp_path, stop, extra, whole_group):
    run = tmp_path / "interrupted"
    process = run_cli(
        ["pretrain", *base_args, "--out", str(run), "--steps", "500", *extra, "--json"], start_new_session=True
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
    result = pretrain([*base_args, *extra, "--out", str(run), "--steps", str(step + 1), "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert len(losses(run)) == step + 1


@pytest.mark.slow
def test_two_processes_match_one_process(base_args, tmp_path):
    """DDP over gloo, launched through accelerate: same global batch, same weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*base_args, "--steps", "2", "--batch-size", "4", "--json"]
    assert pretrain([*common, "--out", str(one)]).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = run_cli(["pretrain", *common, "--out", str(two), "--num-processes", "2"], env=env)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert json.loads(stdout)["checkpoint"] == str(two / "checkpoint-0000002")
    config = json.loads((two / "checkpoint-0000002" / "config.json").read_text())
    assert config["training"]["processes"] == 2
    a, b = weights(one / "checkpoint-0000002"), weights(two / "checkpoint-0000002")
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    assert difference < 1e-6, difference  # summation order differs across processes; seen: ~1.5e-8
    assert losses(one) == pytest.approx(losses(two), rel=1e-5)


@pytest.mark.slow
def test_fsdp_sharded_run_saves_resumes_and_matches_one_process(base_args, tmp_path):
    """FSDP2 over gloo: checkpoints hold the full weights, a resumed sharded run continues
    exactly, and the result matches one unsharded process (EMA, validation and bias changes at their own
    rate included)."""
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    common = [*base_args, "--batch-size", "4", "--ema-decay", "0.5", "--validate-every", "2", "--json"]
    common += ["--bias-lr", "1e-2"]
    assert pretrain([*common, "--out", str(one), "--steps", "2"]).exit_code == 0
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).with_name("fsdp_pretrain.py")),
        "pretrain",
        *common,
        "--out",
        str(sharded),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--steps", "1"], ["--steps", "2", "--resume", "latest"]):
        finished = subprocess.run([*launch, *extra], env=env, capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr[-3000:]
    final_one, final_sharded = one / "checkpoint-0000002", sharded / "checkpoint-0000002"
    assert json.loads((final_sharded / "config.json").read_text())["training"]["processes"] == 2
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(final_one / name)), load_file(str(final_sharded / name))
        assert a.keys() == b.keys() and any(key.startswith("biases.") for key in a)
        difference = max((a[k] - b[k]).abs().max().item() for k in a if not k.startswith("biases."))
        assert difference < 1e-6, (name, difference)
        # Adam divides each bias change's gradient, some of them near zero, by its own running size, so
        # the processes' different summation order shows more in them: seen ~1e-5 of the ~1e-2 they moved
        moved = min(a[k].abs().max().item() for k in a if k.startswith("biases."))
        difference = max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("biases."))
        assert moved > 1e-3 and difference < 2e-4, (name, moved, difference)
    assert losses(one) == pytest.approx(losses(sharded), rel=1e-5)
    assert (sharded / "validation" / "step-0000002.png").is_file()


def deepspeed_launch(args, stage=2):
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--use_deepspeed",
        "--zero_stage",
        str(stage),
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "e4tcli",
        "pretrain",
        *args,
    ]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_deepspeed_zero2_saves_resumes_and_matches_one_process(base_args, tmp_path):
    """ZeRO-2 over gloo (each process holds half the Adam state): checkpoints still hold the full
    weights and moments, a run interrupted under DeepSpeed resumes exactly, and one plain process
    can resume it too; all end where one uninterrupted plain process does."""
    pytest.importorskip("deepspeed")
    one, zero, handed = tmp_path / "one", tmp_path / "zero", tmp_path / "handed"
    common = [*base_args, "--batch-size", "4", "--gradient-accumulation", "2", "--ema-decay", "0.5", "--json"]
    assert pretrain([*common, "--out", str(one), "--steps", "2"]).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--steps", "1"], ["--steps", "2", "--resume", "latest"]):
        finished = subprocess.run(
            deepspeed_launch([*common, "--out", str(zero), *extra]),
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert finished.returncode == 0, finished.stderr[-3000:]
        # DeepSpeed logs to stdout (on a CPU it always warns). e4t's --json keeps the workers' stdout
        # for the one object; only accelerate's launcher, before e4t starts, prints its one warning
        before, _, after = finished.stdout.partition("{\n")
        assert before.count("\n") <= 1, finished.stdout
        assert json.loads("{\n" + after)["steps"] == int(extra[1])
    config = json.loads((zero / "checkpoint-0000002" / "config.json").read_text())
    assert config["training"]["processes"] == 2
    handed_over = pretrain(
        [*common, "--out", str(handed), "--steps", "2", "--resume", str(zero / "checkpoint-0000001")]
    )
    assert handed_over.exit_code == 0, handed_over.output
    for run in (zero, handed):
        for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
            a = load_file(str(one / "checkpoint-0000002" / name))
            b = load_file(str(run / "checkpoint-0000002" / name))
            difference = max_difference(a, b)
            assert difference < 1e-6, (run.name, name, difference)  # seen: ~1.5e-8
    assert losses(zero) == pytest.approx(losses(one), rel=1e-5)
    assert losses(handed) == pytest.approx(losses(one)[1:], rel=1e-5)  # its log starts after the checkpoint


@pytest.mark.slow
def test_deepspeed_zero3_is_refused_before_anything_is_loaded(base_args, tmp_path):
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    finished = subprocess.run(
        deepspeed_launch([*base_args, "--out", str(run), "--steps", "1"], stage=3),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode != 0
    errors = [line for line in finished.stderr.splitlines() if line.startswith("e4t: error:")]
    assert errors and all("ZeRO stages 0-2, not stage 3" in line for line in errors), finished.stderr[-3000:]
    assert not run.exists()


def fake_deepspeed_accelerator(config: dict, processes: int = 2):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    return SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        num_processes=processes,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)),
    )


def test_deepspeed_config_follows_e4t_batch_split_and_precision():
    from e4tcli.training.deepspeed_state import configure_deepspeed

    config = {
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"},
        "bf16": {"enabled": True},
        "gradient_clipping": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 1,
    }
    configure_deepspeed(fake_deepspeed_accelerator(config, processes=4), 3, 2, "adamw")
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (3, 2)
    assert config["train_batch_size"] == 24
    assert config["gradient_clipping"] == 0.0
    assert isinstance(config["zero_optimization"]["reduce_bucket_size"], int)
    # the engine stays fp32 (DeepSpeed's bf16 would cast the encoder); e4t's own autocast does bf16
    assert config["bf16"] == config["fp16"] == config["torch_autocast"] == {"enabled": False}

    clipped = {"zero_optimization": {"stage": 1}, "gradient_clipping": 0.5, "train_batch_size": 4}
    configure_deepspeed(fake_deepspeed_accelerator(clipped), 2, 1, "adamw")
    assert clipped["gradient_clipping"] == 0.5  # numbers the user chose are kept when they agree
    assert clipped["train_batch_size"] == 4


@pytest.mark.parametrize(
    "config, optimizer, message",
    [
        ({"zero_optimization": {"stage": 2}}, "adamw8bit", "adamw8bit"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, "adamw", "'optimizer'"),
        ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, "adamw", "'scheduler'"),
        (
            {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4},
            "adamw",
            "gradient_accumulation_steps to 4",
        ),
        ({"zero_optimization": {"stage": 2}, "train_batch_size": 64}, "adamw", "train_batch_size to 64"),
    ],
)
def test_deepspeed_settings_e4t_cannot_honour_are_refused(config, optimizer, message):
    from e4tcli.errors import UsageError
    from e4tcli.training.deepspeed_state import configure_deepspeed

    with pytest.raises(UsageError, match=message):
        configure_deepspeed(fake_deepspeed_accelerator(config), 2, 1, optimizer)


def test_deepspeed_refuses_to_pretrain_bias_changes_before_loading(monkeypatch, tmp_path, photo_folder, cats_domain):
    import e4tcli.api.pretraining as pretraining
    from e4tcli import api
    from e4tcli.device import Placement
    from e4tcli.errors import UsageError

    launched = fake_deepspeed_accelerator({"zero_optimization": {"stage": 2}})
    monkeypatch.setattr(
        pretraining, "make_accelerator", lambda *_: (launched, Placement(torch.device("cpu"), torch.float32))
    )
    options = api.PretrainOptions(
        data=str(photo_folder), out=str(tmp_path / "run"), base_model=str(tmp_path / "missing"), bias_learning_rate=1e-2
    )
    with pytest.raises(UsageError, match="--bias-lr"):  # not the missing base model: nothing was loaded
        api.pretrain(options, cats_domain)


@pytest.mark.parametrize(
    "zero, dtype, message",
    [
        ({"stage": 3}, torch.float32, "not stage 3"),
        ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, torch.float32, "offload_optimizer"),
        ({"stage": 2}, torch.float16, "fp16"),
    ],
)
def test_deepspeed_launches_e4t_cannot_run_are_refused_before_loading(zero, dtype, message):
    from e4tcli.errors import UsageError
    from e4tcli.training.deepspeed_state import refuse_unsupported_deepspeed

    refuse_unsupported_deepspeed(fake_deepspeed_accelerator({"zero_optimization": {"stage": 2}}), torch.bfloat16)
    with pytest.raises(UsageError, match=message):
        refuse_unsupported_deepspeed(fake_deepspeed_accelerator({"zero_optimization": zero}), dtype)


def test_workers_cache_and_ema(base_args, tmp_path):
    """Decoding in 2 workers or from the feature cache trains exactly like decoding inline; EMA is saved."""
    inline, workers, cached = tmp_path / "inline", tmp_path / "workers", tmp_path / "cached"
    common = [*base_args, "--steps", "2"]
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


def test_unreadable_images_found_by_workers_are_counted(base_args, tmp_path, photo_folder):
    """A file that fails to decode inside a DataLoader worker is reported like one found inline."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(photo_folder / "chelsea.png", data / "chelsea.png")
    shutil.copy(photo_folder / "coffee.png", data / "truncated.png")
    raw = (data / "truncated.png").read_bytes()
    (data / "truncated.png").write_bytes(raw[: len(raw) // 2])
    args = [a if a != str(photo_folder) else str(data) for a in base_args] + ["--steps", "3"]
    counts = {}
    for workers in ("0", "2"):
        result = pretrain([*args, "--out", str(tmp_path / f"run{workers}"), "--workers", workers])
        assert result.exit_code == 0, result.output
        counts[workers] = json.loads(result.stdout)["skipped_images"]
    assert counts == {"0": 1, "2": 1}
