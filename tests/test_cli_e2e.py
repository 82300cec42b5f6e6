"""The CLI end to end on a tiny model: pretrain -> tune -> generate, and every bad input."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from e4tcli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd, tiny_backbone, photo_folder):
    """pretrain (2 steps, via the CLI) -> tune on chelsea; shared by the tests of this module."""
    root = tmp_path_factory.mktemp("cli")
    checkpoint = root / "cats-checkpoint"
    result = runner.invoke(
        app,
        [
            "pretrain",
            "--domain",
            "cats",
            "--data",
            str(photo_folder),
            "--out",
            str(checkpoint),
            "--base-model",
            str(tiny_sd),
            "--backbone",
            str(tiny_backbone),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--resolution",
            "64",
            "--encoder-hidden-dim",
            "64",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    pretrained = json.loads(result.stdout)
    concept = root / "chelsea.safetensors"
    result = runner.invoke(
        app,
        [
            "tune",
            str(photo_folder / "chelsea.png"),
            "--domain",
            "cats",
            "--checkpoint",
            str(checkpoint),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--out",
            str(concept),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    return {
        "root": root,
        "checkpoint": checkpoint,
        "concept": concept,
        "pretrained": pretrained,
        "tuned": json.loads(result.stdout),
    }


def test_pretrain_and_tune_report_json(world):
    final = world["checkpoint"] / "checkpoint-0000002"
    assert world["pretrained"]["checkpoint"] == str(final)
    assert world["pretrained"]["steps"] == 2 and np.isfinite(world["pretrained"]["final_loss"])
    import importlib.util

    tensorboard = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []  # the test extra has it
    assert sorted(p.name for p in world["checkpoint"].iterdir()) == [
        "checkpoint-0000002",
        "latest",
        "log.jsonl",
        "recipe.yaml",
        *tensorboard,
    ]
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors", "optimizer.safetensors"]
    tuned = world["tuned"]
    assert tuned["concept"] == str(world["concept"]) and tuned["steps"] == 3
    assert tuned["size_bytes"] == world["concept"].stat().st_size


def test_generate_writes_pngs_with_parameters_and_a_grid(world):
    out = world["root"] / "images"
    args = [
        "generate",
        str(world["concept"]),
        "S* as an astronaut",
        "--num-images",
        "2",
        "--steps",
        "2",
        "--seed",
        "7",
        "--out",
        str(out),
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [p.rsplit("/", 1)[1] for p in data["images"]] == ["chelsea-7.png", "chelsea-8.png"]
    first = Image.open(data["images"][0])
    assert first.size == (64, 64)
    assert first.text["prompt"] == "S* as an astronaut" and first.text["seed"] == "7"
    assert first.text["steps"] == "2" and first.text["guidance"] == "7.5"
    assert first.text["concept"] == "chelsea.safetensors" and first.text["base_model"]
    assert "Seed: 7," in first.text["parameters"] and "Steps: 2," in first.text["parameters"]
    assert "Seed: 8," in Image.open(data["images"][1]).text["parameters"]
    assert Image.open(data["grid"]).size == (128, 64)

    again = runner.invoke(app, args[:-3] + ["--out", str(world["root"] / "again"), "--json"])
    repeat = json.loads(again.stdout)
    for a, b in zip(data["images"], repeat["images"]):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    other = runner.invoke(
        app,
        [
            "generate",
            str(world["concept"]),
            "S* as an astronaut",
            "--steps",
            "2",
            "--seed",
            "8",
            "--out",
            str(world["root"] / "other"),
            "--json",
        ],
    )
    single = np.asarray(Image.open(json.loads(other.stdout)["images"][0])).astype(int)
    # image i of a batch is seed+i on its own; CPU kernels may round a batch of 2 differently from 1
    assert np.abs(single - np.asarray(Image.open(data["images"][1])).astype(int)).max() <= 2
    assert np.abs(single - np.asarray(Image.open(data["images"][0])).astype(int)).mean() > 5


def test_prompt_without_placeholder_warns_and_proceeds(world):
    result = runner.invoke(
        app, ["generate", str(world["concept"]), "a cat", "--steps", "1", "--out", str(world["root"] / "noph")]
    )
    assert result.exit_code == 0
    assert "does not contain 'S*'" in result.stderr
    assert (world["root"] / "noph" / "chelsea-0.png").is_file()


def one_line_error(result, code):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("e4t: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_unreadable_and_non_image_files(world, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    line = one_line_error(
        runner.invoke(app, ["tune", str(text), "--domain", "cats", "--checkpoint", str(world["checkpoint"])]), 2
    )
    assert "cannot read" in line and "jpg, png or webp" in line
    line = one_line_error(
        runner.invoke(
            app, ["tune", str(tmp_path / "missing.jpg"), "--domain", "cats", "--checkpoint", str(world["checkpoint"])]
        ),
        2,
    )
    assert "image not found" in line


def test_missing_checkpoint(world, photo_folder, tmp_path):
    image = str(photo_folder / "chelsea.png")
    missing = str(tmp_path / "no-such-folder")
    line = one_line_error(runner.invoke(app, ["tune", image, "--domain", "cats", "--checkpoint", missing]), 2)
    assert f"domain checkpoint '{missing}' not found" in line and "--checkpoint none" in line
    line = one_line_error(runner.invoke(app, ["tune", image, "--domain", "cats", "--checkpoint", str(tmp_path)]), 2)
    assert "no domain checkpoint" in line
    line = one_line_error(
        runner.invoke(app, ["tune", image, "--domain", "faces", "--checkpoint", str(world["checkpoint"])]), 2
    )
    assert "pre-trained for domain 'cats'" in line


def test_concept_for_another_base_model_is_refused(world, tmp_path):
    from e4tcli.tiny import build_tiny_base_model

    other = build_tiny_base_model(tmp_path / "other-sd", seed=1)
    line = one_line_error(
        runner.invoke(
            app,
            [
                "generate",
                str(world["concept"]),
                "S*",
                "--steps",
                "1",
                "--base-model",
                str(other),
                "--out",
                str(tmp_path / "o"),
            ],
        ),
        2,
    )
    assert "base model mismatch" in line and "--base-model" in line
    assert not (tmp_path / "o").exists()


def test_not_a_concept_file(world, tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x00" * 64)
    line = one_line_error(runner.invoke(app, ["generate", str(bogus), "S*"]), 2)
    assert "not a safetensors file" in line
    line = one_line_error(runner.invoke(app, ["generate", str(tmp_path / "none.safetensors"), "S*"]), 2)
    assert "concept file not found" in line


def test_nan_loss_stops_and_keeps_the_existing_file(world, photo_folder, tmp_path):
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")
    result = runner.invoke(
        app,
        [
            "tune",
            str(photo_folder / "chelsea.png"),
            "--domain",
            "cats",
            "--checkpoint",
            str(world["checkpoint"]),
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--lr",
            "1e30",
            "--out",
            str(out),
            "--force",
        ],
    )
    line = one_line_error(result, 1)
    assert "at step" in line and "nothing was written" in line
    assert out.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


def test_unknown_domain_and_bad_flags(world, photo_folder):
    line = one_line_error(runner.invoke(app, ["tune", str(photo_folder / "chelsea.png"), "--domain", "dogs"]), 2)
    assert "unknown domain 'dogs'" in line
    assert runner.invoke(app, ["generate", str(world["concept"]), "S*", "--num-images", "0"]).exit_code == 2
    line = one_line_error(
        runner.invoke(app, ["generate", str(world["concept"]), "S*", "--height", "60", "--steps", "1"]), 2
    )
    assert "multiples of 8" in line


def test_faces_domain_aligns_a_face_and_refuses_a_photo_without_one(tiny_sd, tiny_backbone, photo_folder, tmp_path):
    checkpoint = tmp_path / "faces"
    result = runner.invoke(
        app,
        [
            "pretrain",
            "--domain",
            "faces",
            "--data",
            str(photo_folder),
            "--out",
            str(checkpoint),
            "--base-model",
            str(tiny_sd),
            "--backbone",
            str(tiny_backbone),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--resolution",
            "64",
            "--encoder-hidden-dim",
            "32",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    tuned = runner.invoke(
        app,
        [
            "tune",
            str(photo_folder / "astronaut.png"),
            "--domain",
            "faces",
            "--checkpoint",
            str(checkpoint),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "face.safetensors"),
            "--json",
        ],
    )
    assert tuned.exit_code == 0, tuned.output
    line = one_line_error(
        runner.invoke(
            app,
            [
                "tune",
                str(photo_folder / "coffee.png"),
                "--domain",
                "faces",
                "--checkpoint",
                str(checkpoint),
                "--steps",
                "1",
            ],
        ),
        2,
    )
    assert "coffee.png" in line and "no face found" in line


def test_encoder_runs_at_every_denoising_step_on_the_current_latent(world, monkeypatch):
    import torch

    from e4tcli import api
    from e4tcli.device import choose_placement
    from e4tcli.models.e4t import E4TModel
    from e4tcli.pipeline import SamplingSettings, generate_images

    model, concept = api.load_concept_model(str(world["concept"]), None, choose_placement("cpu"))
    calls = []
    original = E4TModel.concept_embedding

    def spy(self, image_features, noisy, timesteps, class_states):
        result = original(self, image_features, noisy, timesteps, class_states)
        calls.append((int(timesteps[0]), noisy.clone(), result[0].clone()))
        return result

    monkeypatch.setattr(E4TModel, "concept_embedding", spy)
    generate_images(model, SamplingSettings(prompt="S* in a box", steps=4, height=64, width=64))
    from e4tcli.pipeline import build_pipeline

    scheduler = build_pipeline(model).scheduler
    scheduler.set_timesteps(4)
    assert [t for t, _, _ in calls] == scheduler.timesteps.tolist()
    assert not torch.equal(calls[0][1], calls[-1][1]), "each call sees the current latent"
    assert not torch.equal(calls[0][2], calls[-1][2]), "so S* changes from step to step"


def test_unknown_offset_layers_is_a_usage_error(photo_folder, tmp_path):
    result = runner.invoke(
        app,
        [
            "pretrain",
            "--domain",
            "cats",
            "--data",
            str(photo_folder),
            "--out",
            str(tmp_path / "r"),
            "--offset-layers",
            "everything",
        ],
    )
    assert result.exit_code == 2
    assert "--offset-layers 'everything'" in result.output and "attention+resnets" in result.output
    assert not (tmp_path / "r").exists()


def test_lowrank_offsets_on_attention_and_resnets_end_to_end(tiny_sd, tiny_backbone, photo_folder, tmp_path):
    checkpoint = tmp_path / "lowrank"
    result = runner.invoke(
        app,
        [
            "pretrain",
            "--domain",
            "cats",
            "--data",
            str(photo_folder),
            "--out",
            str(checkpoint),
            "--offsets",
            "lowrank",
            "--offset-rank",
            "2",
            "--offset-layers",
            "attention+resnets",
            "--base-model",
            str(tiny_sd),
            "--backbone",
            str(tiny_backbone),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--resolution",
            "64",
            "--encoder-hidden-dim",
            "32",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    concept = tmp_path / "c.safetensors"
    tuned = runner.invoke(
        app,
        [
            "tune",
            str(photo_folder / "chelsea.png"),
            "--domain",
            "cats",
            "--checkpoint",
            str(checkpoint),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(concept),
            "--lambda-emb",
            "0.5",
            "--offset-lr",
            "0.02",
            "--json",
        ],
    )
    assert tuned.exit_code == 0, tuned.output
    from e4tcli.io.concept import load_concept

    loaded = load_concept(concept)
    assert loaded.info["offsets"]["kind"] == "lowrank" and loaded.info["tuning"]["lambda_emb"] == 0.5
    assert loaded.info["tuning"]["offset_learning_rate"] == 0.02
    assert loaded.info["offsets"]["layers"] == "attention+resnets"
    column = next(v for k, v in loaded.tensors.items() if k.endswith(".column"))
    assert column.shape[1] == 2
    assert any(k.endswith("resnets.0.conv1.column") for k in loaded.tensors)
    generated = runner.invoke(app, ["generate", str(concept), "S*", "--steps", "2", "--out", str(tmp_path / "o")])
    assert generated.exit_code == 0, generated.output


def test_unknown_save_precision_is_refused_before_anything_is_written(world, photo_folder, tmp_path):
    out = tmp_path / "c.safetensors"
    result = runner.invoke(
        app,
        [
            "tune",
            str(photo_folder / "chelsea.png"),
            "--domain",
            "cats",
            "--checkpoint",
            str(world["checkpoint"]),
            "--out",
            str(out),
            "--save-precision",
            "int4",
        ],
    )
    assert result.exit_code == 2
    assert "--save-precision" in result.output and "int4" in result.output and "fp16" in result.output
    assert not out.exists()


# --------------------------------------------------------------------------- nothing replaced, writes explained
def tune_args(world, photo_folder, out, *extra):
    return [
        "tune",
        str(photo_folder / "chelsea.png"),
        "--domain",
        "cats",
        "--checkpoint",
        str(world["checkpoint"]),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def test_generation_in_batches_gives_the_same_pixels(world):
    images = {}
    for batch in (1, 2, 3):
        out = world["root"] / f"batch-{batch}"
        result = runner.invoke(
            app,
            [
                "generate",
                str(world["concept"]),
                "S* in a box",
                "-n",
                "3",
                "--steps",
                "2",
                "--batch-size",
                str(batch),
                "--out",
                str(out),
                "--json",
            ],
        )
        assert result.exit_code == 0, result.output
        images[batch] = [np.asarray(Image.open(p)).astype(int) for p in json.loads(result.stdout)["images"]]
    for batch in (2, 3):
        # CPU kernels may round a batch differently from a single image, by a level or two
        assert max(np.abs(a - b).max() for a, b in zip(images[1], images[batch])) <= 2
    assert np.abs(images[1][0] - images[1][1]).mean() > 5


def test_tune_replaces_an_existing_file_only_with_force(world, photo_folder, tmp_path):
    from e4tcli.io.concept import read_concept_info

    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"precious")
    line = one_line_error(runner.invoke(app, tune_args(world, photo_folder, out)), 2)
    assert str(out) in line and "already exists" in line and "--force" in line
    assert out.read_bytes() == b"precious"
    assert runner.invoke(app, tune_args(world, photo_folder, out, "--force")).exit_code == 0
    assert read_concept_info(out)["domain"] == "cats"
    (tmp_path / "folder.safetensors").mkdir()
    line = one_line_error(runner.invoke(app, tune_args(world, photo_folder, tmp_path / "folder.safetensors")), 2)
    assert "is a folder" in line


def test_generate_writes_beside_older_images_unless_forced(world, tmp_path):
    (tmp_path / "chelsea-0.png").write_bytes(b"old")
    args = ["generate", str(world["concept"]), "S*", "--steps", "1", "--out", str(tmp_path)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert [p.rsplit("/", 1)[1] for p in json.loads(result.stdout)["images"]] == ["chelsea-0-run2.png"]
    assert "chelsea-0-run2.png" in result.stderr and "--force" in result.stderr
    assert (tmp_path / "chelsea-0.png").read_bytes() == b"old"
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    Image.open(tmp_path / "chelsea-0.png").load()
    line = one_line_error(runner.invoke(app, [*args[:-1], str(tmp_path / "chelsea-0.png")]), 2)
    assert "is a file, not a folder" in line


def test_pretrain_into_a_folder_of_another_run_needs_resume_or_force(world, tiny_sd, tiny_backbone, photo_folder):
    log = world["checkpoint"] / "log.jsonl"
    before = log.read_bytes()
    result = runner.invoke(
        app,
        [
            "pretrain",
            "--domain",
            "cats",
            "--data",
            str(photo_folder),
            "--out",
            str(world["checkpoint"]),
            "--base-model",
            str(tiny_sd),
            "--backbone",
            str(tiny_backbone),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--resolution",
            "64",
            "--encoder-hidden-dim",
            "64",
        ],
    )
    line = one_line_error(result, 2)
    assert "already holds files" in line and "--resume latest" in line and "--force" in line
    assert log.read_bytes() == before


@pytest.mark.parametrize(
    "code, advice",
    [
        (errno.ENOSPC, "free some disk space"),
        (errno.EACCES, "may write to"),
        (errno.EROFS, "read-only"),
        (errno.EFBIG, "ulimit -f"),
    ],
)
def test_a_refused_write_is_one_plain_line_and_the_old_file_survives(
    world, photo_folder, tmp_path, monkeypatch, code, advice
):
    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a concept")
        raise OSError(code, os.strerror(code), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"precious")
    line = one_line_error(runner.invoke(app, tune_args(world, photo_folder, out, "--force")), 1)
    assert line.startswith(f"e4t: error: could not write {out}: {os.strerror(code).lower()}") and advice in line
    assert "unexpected" not in line
    assert out.read_bytes() == b"precious" and [p.name for p in tmp_path.iterdir()] == ["mine.safetensors"]


def test_a_full_disk_while_generating_keeps_no_half_image(world, tmp_path, monkeypatch):
    def failing_save(image, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half an image")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", failing_save)
    line = one_line_error(
        runner.invoke(app, ["generate", str(world["concept"]), "S*", "--steps", "1", "--out", str(tmp_path)]), 1
    )
    assert f"could not write {tmp_path / 'chelsea-0.png'}: no space left on device" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_file_size_limit_stops_tune_with_one_line(world, photo_folder, tmp_path):
    """A real refusal from the kernel: RLIMIT_FSIZE makes writes past the limit fail with EFBIG."""
    import resource
    import signal
    import subprocess
    import sys

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"precious")
    result = subprocess.run(
        [sys.executable, "-m", "e4tcli", *tune_args(world, photo_folder, out, "--force")],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"e4t: error: could not write {out}: file too large"), result.stderr
    assert out.read_bytes() == b"precious" and [p.name for p in tmp_path.iterdir()] == ["mine.safetensors"]


def test_encoder_every_k_steps_reuses_s_star_between_and_is_reported(world, tmp_path, monkeypatch):
    from e4tcli.models.e4t import E4TModel

    calls = []
    original = E4TModel.concept_embedding

    def spy(self, image_features, noisy, timesteps, class_states):
        calls.append(int(timesteps[0]))
        return original(self, image_features, noisy, timesteps, class_states)

    monkeypatch.setattr(E4TModel, "concept_embedding", spy)
    pixels, seen = {}, {}
    for every in (1, 3):
        calls.clear()
        out = tmp_path / f"every-{every}"
        result = runner.invoke(
            app,
            ["generate", str(world["concept"]), "S* in a box", "--steps", "7", "--encoder-every", str(every)]
            + ["--out", str(out), "--height", "64", "--width", "64"],
        )
        assert result.exit_code == 0, result.output
        seen[every] = list(calls)
        (image,) = out.glob("*.png")
        assert Image.open(image).text["encoder_every"] == str(every)
        pixels[every] = np.asarray(Image.open(image), dtype=np.float32)
    assert len(seen[1]) >= 7 and seen[3] == seen[1][::3], "the encoder runs at steps 0, 3, 6, ..."
    assert np.abs(pixels[1] - pixels[3]).max() > 0, "reusing S* changes the image a little"
