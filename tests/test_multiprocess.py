"""Pre-training across processes (DDP, FSDP2, DeepSpeed ZeRO) ends where one process does; launches e4t
cannot run are refused before anything loads. Their own module, so that a parallel test run spreads them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_pretrain_robust import losses, pretrain, run_cli, weights


@pytest.mark.slow
def test_two_processes_match_one_process(pretrain_args, tmp_path):
    """DDP over gloo, launched through accelerate: same global batch, same weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*pretrain_args, "--steps", "2", "--batch-size", "4", "--json"]
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
def test_fsdp_sharded_run_saves_resumes_and_matches_one_process(pretrain_args, tmp_path):
    """FSDP2 over gloo: checkpoints hold the full weights, a resumed sharded run continues
    exactly, and the result matches one unsharded process (EMA, validation and bias changes at their own
    rate included)."""
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    common = [*pretrain_args, "--batch-size", "4", "--ema-decay", "0.5", "--validate-every", "2", "--json"]
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
def test_deepspeed_zero2_saves_resumes_and_matches_one_process(pretrain_args, tmp_path):
    """ZeRO-2 over gloo (each process holds half the Adam state): checkpoints still hold the full
    weights and moments, a run interrupted under DeepSpeed resumes exactly, and one plain process
    can resume it too; all end where one uninterrupted plain process does."""
    pytest.importorskip("deepspeed")
    one, zero, handed = tmp_path / "one", tmp_path / "zero", tmp_path / "handed"
    common = [*pretrain_args, "--batch-size", "4", "--gradient-accumulation", "2", "--ema-decay", "0.5", "--json"]
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
def test_deepspeed_zero3_is_refused_before_anything_is_loaded(pretrain_args, tmp_path):
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    finished = subprocess.run(
        deepspeed_launch([*pretrain_args, "--out", str(run), "--steps", "1"], stage=3),
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
