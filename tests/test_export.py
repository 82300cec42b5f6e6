"""`e4t export` and `e4t concept info`, checked with diffusers' own loaders on a tiny model."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from e4tcli.cli import app

runner = CliRunner()


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def concept(tmp_path_factory, tiny_sd, tiny_backbone, photo_folder):
    """A cats concept on the tiny model, with offsets on attention and ResNet convolutions, made large (a
    few tuning steps barely move them), so that a LoRA that lost or mangled them would show in the pixels."""

    root = tmp_path_factory.mktemp("export")
    checkpoint = root / "checkpoint"
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
            "--offset-layers",
            "attention+resnets",
        ],
    )
    assert result.exit_code == 0, result.output
    tuned = root / "tuned.safetensors"
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
            "2",
            "--batch-size",
            "2",
            "--out",
            str(tuned),
            "--additive-rank",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    return with_large_offsets(tuned, root / "chelsea.safetensors")


def with_large_offsets(tuned, path):
    """``tuned``'s concept with its offsets' factors and its additive changes' factors drawn at random (a few
    tuning steps barely move them), saved in fp32 at ``path``, so that an export that lost or mangled them
    shows in the pixels."""
    from e4tcli.io.concept import load_concept, save_concept

    loaded = load_concept(tuned)
    generator = torch.Generator().manual_seed(0)
    scale = {"offsets": 1.0, "additive": 0.1}  # U V^T is added to the weights, not multiplied: kept smaller
    tensors = {
        name: scale[group] * torch.randn(value.shape, generator=generator) if group in scale else value
        for name, value in loaded.tensors.items()
        for group in [name.split(".")[0]]
    }
    save_concept(path, tensors, loaded.info, precision="fp32")
    return path


def export(concept, out, *extra):
    result = runner.invoke(app, ["export", str(concept), "--out", str(out), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def plain_pipeline(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, prompt, seed=0, steps=4):
    """Same noise and sampler randomness as ``e4t generate`` draws image 0 of seed ``seed`` with."""
    from e4tcli.pipeline import SamplingSettings, initial_latents

    class Shape:  # initial_latents reads the model's shapes only
        vae, unet = pipe.vae, pipe.unet
        placement = type("P", (), {"device": torch.device("cpu")})

    latents = initial_latents(Shape, SamplingSettings(prompt=prompt, seed=seed, height=64, width=64))
    image = pipe(
        prompt,
        latents=latents,
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(seed + 10_000)],
        output_type="np",
    ).images[0]
    return image


def draw_e4t(concept, tiny_sd, prompt, fixed, steps=4):
    from e4tcli.api import load_concept_model
    from e4tcli.device import choose_placement
    from e4tcli.pipeline import SamplingSettings, generate_images

    model, loaded = load_concept_model(str(concept), str(tiny_sd), choose_placement("cpu"))
    image = generate_images(
        model,
        SamplingSettings(prompt=prompt, steps=steps, height=64, width=64),
        fixed_concept=fixed,
    )[0]
    return np.asarray(image, dtype=np.float32) / 255.0


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_exported_files_load_in_a_plain_diffusers_pipeline_and_draw_what_e4t_draws(concept, tiny_sd, tmp_path, format):
    from safetensors.torch import load_file

    out = tmp_path / format
    result = export(concept, out, "--format", format, "--rank", "full", "--token", "sks-kitty")
    assert result["token"] == "sks-kitty" and result["energy_kept"] == pytest.approx(1.0)
    names = sorted(p.name for p in out.iterdir())
    if format == "diffusers":
        assert names == ["README.md", "learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]
        embedding_file, lora_file = out / "learned_embeds.safetensors", out / "pytorch_lora_weights.safetensors"
        fixed = load_file(embedding_file)["sks-kitty"]
    else:
        assert names == ["sks-kitty-lora.safetensors", "sks-kitty.safetensors"]
        embedding_file, lora_file = out / "sks-kitty.safetensors", out / "sks-kitty-lora.safetensors"
        fixed = load_file(embedding_file)["emb_params"]
    assert fixed.shape == (1, 32)

    pipe = plain_pipeline(tiny_sd)
    pipe.load_textual_inversion(str(embedding_file), token="sks-kitty")
    embedding_only = draw(pipe, "a photo of sks-kitty in a box")
    pipe.load_lora_weights(str(out), weight_name=lora_file.name)
    exported = draw(pipe, "a photo of sks-kitty in a box")
    native = draw_e4t(concept, tiny_sd, "a photo of S* in a box", fixed)

    difference = np.abs(exported - native).max()
    assert difference < 0.02, difference  # fp16 LoRA factors; e4t forms W * (1 + dW) in fp32
    assert np.abs(embedding_only - native).max() > 10 * difference  # the LoRA carries the offsets


def test_every_lora_key_names_a_module_of_the_base_unet_with_its_shape(concept, tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd), subfolder="unet")
    modules = dict(unet.named_modules())
    export(concept, tmp_path / "k", "--format", "kohya", "--rank", "2", "--token", "sks-kitty")
    export(concept, tmp_path / "d", "--format", "diffusers", "--rank", "2", "--token", "sks-kitty")
    by_kohya_name = {"lora_unet_" + name.replace(".", "_"): module for name, module in modules.items()}

    kohya = load_file(tmp_path / "k" / "sks-kitty-lora.safetensors")
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert len(downs) == len(kohya) // 3 and len(downs) >= 12
    assert any("_resnets_" in key and kohya[key].dim() == 4 for key in downs)  # convolutions too
    for key in downs:
        layer = key.split(".")[0]
        module = by_kohya_name[layer]
        assert kohya[f"{layer}.lora_up.weight"].shape[0] == module.weight.shape[0]
        assert kohya[key].shape[1:] == module.weight.shape[1:]
        assert float(kohya[f"{layer}.alpha"]) == kohya[key].shape[0] == 2

    peft = load_file(tmp_path / "d" / "pytorch_lora_weights.safetensors")
    for key, value in peft.items():
        name = key.removeprefix("unet.").rsplit(".", 2)[0]
        assert key.startswith("unet.") and name in modules
        assert value.shape[0 if key.endswith("lora_A.weight") else 1] == 2


def test_truncated_lora_keeps_the_largest_singular_values():
    from e4tcli.export.lora import factor, weight_change

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(12, 9, generator=generator)
    column, row = torch.randn(12, 1, generator=generator), torch.randn(9, 1, generator=generator)
    change = weight.double() * (column.double() @ row.double().T)
    np.testing.assert_allclose(weight_change(weight, column, row).numpy(), change.numpy(), rtol=1e-12)
    singular = np.linalg.svd(change.numpy(), compute_uv=False)

    for rank in (1, 3):
        lora = factor(change, rank)
        assert lora.down.shape == (rank, 9) and lora.up.shape == (12, rank)
        kept = (singular[:rank] ** 2).sum() / (singular**2).sum()
        assert lora.energy_kept / lora.energy == pytest.approx(kept, rel=1e-6)
        residual = np.linalg.norm(change.numpy() - (lora.up @ lora.down).double().numpy())
        assert residual == pytest.approx(np.sqrt((singular[rank:] ** 2).sum()), rel=1e-4)
    full = factor(change)
    np.testing.assert_allclose((full.up @ full.down).numpy(), change.numpy(), atol=1e-5)

    conv_weight = torch.randn(6, 4, 3, 3, generator=generator)
    conv_change = weight_change(
        conv_weight, torch.randn(6, 2, generator=generator), torch.randn(4, 2, generator=generator)
    )
    lora = factor(conv_change)
    assert lora.down.shape == (6, 4, 3, 3) and lora.up.shape == (6, 6, 1, 1)
    rebuilt = torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(torch.ones(1, 4, 5, 5), lora.down, padding=1), lora.up
    )
    expected = torch.nn.functional.conv2d(torch.ones(1, 4, 5, 5), conv_change.float(), padding=1)
    torch.testing.assert_close(rebuilt, expected, atol=1e-4, rtol=1e-4)


def test_export_never_replaces_files_without_force(concept, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sks-kitty.safetensors").write_bytes(b"precious")
    line = one_line_error(
        runner.invoke(app, ["export", str(concept), "--format", "kohya", "--out", str(out), "--token", "sks-kitty"])
    )
    assert "sks-kitty.safetensors already exists" in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["sks-kitty.safetensors"]
    assert (out / "sks-kitty.safetensors").read_bytes() == b"precious"
    export(concept, out, "--format", "kohya", "--token", "sks-kitty", "--force", "--rank", "1")
    assert (out / "sks-kitty.safetensors").read_bytes() != b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["sks-kitty-lora.safetensors", "sks-kitty.safetensors"]


def test_export_bad_input_is_one_line_and_writes_nothing(concept, tmp_path):
    from e4tcli.tiny import build_tiny_base_model

    other = build_tiny_base_model(tmp_path / "other-sd", seed=1)
    out = tmp_path / "out"
    cases = [
        (["--format", "onnx"], "unknown export format 'onnx'"),
        (["--format", "kohya", "--rank", "-3"], "--rank '-3' is not a positive number"),
        (["--format", "kohya", "--token", "a photo"], "--token 'a photo'"),
        (["--format", "kohya", "--token", "cat"], "already a word of the base model"),
        (["--format", "kohya", "--base-model", str(other)], "base model mismatch"),
    ]
    for extra, expected in cases:
        line = one_line_error(runner.invoke(app, ["export", str(concept), "--out", str(out), *extra]))
        assert expected in line, line
        assert not out.exists()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    line = one_line_error(runner.invoke(app, ["export", str(junk), "--format", "kohya", "--out", str(out)]))
    assert "is not a safetensors file" in line and not out.exists()


def test_concept_info_describes_concepts_and_exported_files(concept, tmp_path):
    result = runner.invoke(app, ["concept", "info", str(concept), "--json"])
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    assert described["kind"] == "concept" and described["domain"] == "cats" and described["steps"] == 2
    assert described["offsets"]["count"] == sum(1 for t in described["tensors"] if t["name"].endswith(".column"))
    assert described["base_model"]["fingerprint"] and described["created"].endswith("Z")
    assert sum(t["bytes"] for t in described["tensors"]) <= described["size_bytes"]

    export(concept, tmp_path / "k", "--format", "kohya", "--token", "sks-kitty", "--rank", "3")
    result = runner.invoke(app, ["concept", "info", str(tmp_path / "k" / "sks-kitty-lora.safetensors"), "--json"])
    described = json.loads(result.stdout)
    assert described["kind"] == "exported lora" and described["rank"] == 3 and described["token"] == "sks-kitty"
    assert 0 < described["energy_kept"] < 1 and described["domain"] == "cats"
    shown = runner.invoke(app, ["concept", "info", str(tmp_path / "k" / "sks-kitty.safetensors")])
    assert shown.exit_code == 0 and "exported embedding" in shown.stdout and "sks-kitty" in shown.stdout

    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(other))
    line = one_line_error(runner.invoke(app, ["concept", "info", str(other)]))
    assert "is not an e4t concept or exported file" in line


@pytest.mark.slow
def test_docs_script_draws_an_exported_concept(concept, tiny_sd, tmp_path):
    """docs/export.md's plain diffusers script, pointed at the tiny model and a fresh export, runs."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    docs = (Path(__file__).resolve().parent.parent / "docs" / "export.md").read_text()
    script = next(
        block
        for block in re.findall(r"```python\n(.*?)```", docs, flags=re.S)
        if block.startswith("# draw_exported.py")
    )
    exported = export(concept, tmp_path / "my-cat", "--format", "diffusers", "--rank", "4")
    script, replaced = re.subn(r'^base = "[^"]+"', f'base = "{tiny_sd}"', script, flags=re.M)
    script, also = re.subn(
        r'^folder, token = "my-cat", "my-cat"', f'folder, token = "my-cat", "{exported["token"]}"', script, flags=re.M
    )
    assert replaced == also == 1
    (tmp_path / "draw_exported.py").write_text(script)
    result = subprocess.run([sys.executable, "draw_exported.py"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "astronaut.png") as image:
        assert image.size == (64, 64) and np.asarray(image.convert("L")).std() > 1
