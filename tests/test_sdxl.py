"""Stable Diffusion XL through the model-family seam, on a tiny random SDXL: text states as diffusers forms
them, the placeholder in both embedding tables, and pretrain / tune / generate / export end to end."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from e4tcli.cli import app
from e4tcli.device import choose_placement
from e4tcli.models.e4t import E4TModel, unet_channels
from e4tcli.models.encoder import EncoderConfig
from e4tcli.models.family import SD, SDXL
from e4tcli.models.loading import load_base_model
from e4tcli.models.weight_offsets import OffsetConfig
from tests.test_export import draw_e4t, with_large_offsets  # both family-independent

runner = CliRunner()


def sdxl_pipeline(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build(tiny_sdxl):
    base = load_base_model(str(tiny_sdxl))
    config = EncoderConfig(
        backbone_hidden_size=32,
        backbone_layers=(2, 4),
        unet_channels=unet_channels(base.unet),
        embedding_dim=64,
        hidden_dim=48,
    )
    return E4TModel(base, "cat", config, OffsetConfig(rank=2), choose_placement("cpu"))


def test_the_family_is_read_from_the_model_folder(tiny_sd, tiny_sdxl):
    sd, sdxl = load_base_model(str(tiny_sd)), load_base_model(str(tiny_sdxl))
    assert sd.family.name == SD and len(sd.text_encoders) == 1
    assert sdxl.family.name == SDXL and len(sdxl.text_encoders) == 2
    assert sdxl.family.pooled_width == 32  # the second encoder's projection, as the UNet's config implies
    assert sdxl.fingerprint != load_base_model(str(tiny_sd)).fingerprint


def test_an_sdxl_refiner_is_refused_by_name(tiny_sdxl, tmp_path):
    """A refiner has only the second text encoder: it is named, not left to fail while loading."""
    import shutil

    from e4tcli.errors import UsageError

    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    (refiner / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None]}))
    with pytest.raises(UsageError, match="refiner"):
        load_base_model(str(refiner))


def test_text_states_are_what_the_diffusers_pipeline_conditions_on(tiny_sdxl):
    """Without S*, e4t's conditioning of the UNet equals StableDiffusionXLPipeline's own prompt encoding."""
    model = build(tiny_sdxl)
    prompts = ["a photo of a cat on a sofa", "a cat"]
    with torch.no_grad():
        states = model.encode_text(model.tokenize(prompts))
        conditioning = model.unet_conditioning(states, torch.zeros(2, 4, 8, 8))
    pipe = sdxl_pipeline(tiny_sdxl)
    expected, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(conditioning["encoder_hidden_states"], expected, atol=1e-5)
    assert torch.allclose(conditioning["added_cond_kwargs"]["text_embeds"], pooled, atol=1e-5)
    time_ids = conditioning["added_cond_kwargs"]["time_ids"]
    assert time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # 8x8 latents of a VAE that downsamples by 8


def test_s_star_is_a_word_of_both_text_encoders(tiny_sdxl):
    """S* = c conditions the UNet exactly as diffusers does after loading c's halves as a textual inversion
    into the two text encoders: the first half reaches the first encoder, the second half the second
    encoder's states and its pooled embedding."""
    model = build(tiny_sdxl)
    class_word = model.class_embedding()
    assert class_word.shape == (64,)
    concept = class_word + torch.randn(64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        as_class = model.encode_text(model.tokenize(["a photo of cat"]))
        starts = model.encode_text(model.tokenize(["a photo of S*"]), concept=class_word[None])
        states = model.encode_text(model.tokenize(["a photo of S*"]), concept=concept[None])
        conditioning = model.unet_conditioning(states, torch.zeros(1, 4, 8, 8))
    assert torch.allclose(starts, as_class, atol=1e-6)  # S* starts as the class word in both tables
    pipe = sdxl_pipeline(tiny_sdxl)
    for half, encoder, tokenizer in ((concept[:32], pipe.text_encoder, pipe.tokenizer),
                                     (concept[32:], pipe.text_encoder_2, pipe.tokenizer_2)):  # fmt: skip
        pipe.load_textual_inversion(half[None], token="sks", text_encoder=encoder, tokenizer=tokenizer)
    expected, _, pooled, _ = pipe.encode_prompt("a photo of sks", device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(conditioning["encoder_hidden_states"], expected, atol=1e-5)
    assert torch.allclose(conditioning["added_cond_kwargs"]["text_embeds"], pooled, atol=1e-5)
    assert not torch.allclose(states[:, :-1, :32], as_class[:, :-1, :32], atol=1e-3)
    assert not torch.allclose(states[:, :-1, 32:], as_class[:, :-1, 32:], atol=1e-3)


def test_the_pooled_embedding_is_taken_at_the_end_of_text_whatever_the_config_says(tiny_sdxl, tmp_path):
    """SDXL's released text-encoder configs say eos_token_id 2, for which transformers pools at the highest
    token id in the prompt: S*'s. e4t pools at the real end of text, as the tiny model's configs say."""
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_sdxl, legacy)
    for encoder in ("text_encoder", "text_encoder_2"):
        config_file = legacy / encoder / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "eos_token_id": 2}))
    concept = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    states = []
    for folder in (tiny_sdxl, legacy):
        model = build(folder)
        with torch.no_grad():
            states.append(model.encode_text(model.tokenize(["a photo of S* on a sofa"]), concept=concept))
    assert torch.equal(states[0], states[1])


def test_an_fp16_vae_encodes_in_fp32_when_asked(tiny_sdxl):
    import copy

    from diffusers import AutoencoderKL

    from e4tcli.training.images import latent_distribution

    vae = AutoencoderKL.from_pretrained(str(tiny_sdxl), subfolder="vae").half()
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = latent_distribution(copy.deepcopy(vae).float(), pixels)[0]
    upcast = latent_distribution(vae, pixels, upcast=True)[0]
    assert vae.dtype == torch.float16  # back as it was
    assert torch.equal(upcast, expected)


@pytest.fixture(scope="module")
def sdxl_concept(tmp_path_factory, tiny_sdxl, tiny_backbone, photo_folder):
    """A cats concept pre-trained and tuned on the tiny SDXL with the CLI, its offsets then made large
    (a few steps barely move them) so an export that lost them shows in the pixels."""
    from e4tcli.io.concept import load_concept

    root = tmp_path_factory.mktemp("sdxl")
    checkpoint = root / "checkpoint"
    pretrain = [
        "pretrain", "--domain", "cats", "--data", str(photo_folder), "--out", str(checkpoint),
        "--base-model", str(tiny_sdxl), "--backbone", str(tiny_backbone), "--steps", "2", "--batch-size", "2",
        "--resolution", "64", "--encoder-hidden-dim", "64", "--offset-layers", "attention+resnets",
    ]  # fmt: skip
    result = runner.invoke(app, pretrain)
    assert result.exit_code == 0, result.output
    tuned = root / "tuned.safetensors"
    tune = [
        "tune", str(photo_folder / "chelsea.png"), "--domain", "cats", "--checkpoint", str(checkpoint),
        "--steps", "2", "--batch-size", "2", "--out", str(tuned),
    ]  # fmt: skip
    result = runner.invoke(app, tune)
    assert result.exit_code == 0, result.output
    assert load_concept(tuned).info["encoder"]["embedding_dim"] == 64  # one word in both embedding tables
    return with_large_offsets(tuned, root / "chelsea.safetensors")


def test_generate_draws_an_sdxl_concept_and_says_so(sdxl_concept, tiny_sdxl, tmp_path):
    from PIL import Image

    out = tmp_path / "images"
    generate = [
        "generate", str(sdxl_concept), "S* as an astronaut", "--num-images", "2", "--steps", "3",
        "--base-model", str(tiny_sdxl), "--out", str(out), "--json",
    ]  # fmt: skip
    result = runner.invoke(app, generate)
    assert result.exit_code == 0, result.output
    images = json.loads(result.stdout)["images"]
    assert len(images) == 2
    with Image.open(images[0]) as first, Image.open(images[1]) as second:
        assert first.size == (64, 64) and first.text["model_family"] == SDXL
        assert np.asarray(first).std() > 0 and not np.array_equal(np.asarray(first), np.asarray(second))


def draw_plain(pipe, prompt, seed=0, steps=4):
    """What ``e4t generate`` draws image 0 of seed ``seed`` with: the same noise and sampler randomness."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    image = pipe(
        prompt,
        latents=latents,
        num_inference_steps=steps,
        guidance_scale=7.5,  # e4t's default; the SDXL pipeline's is 5
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(seed + 10_000)],
        output_type="np",
    ).images[0]
    return image


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_exports_load_in_the_sdxl_pipeline_and_draw_what_e4t_draws(sdxl_concept, tiny_sdxl, tmp_path, format):
    out = tmp_path / format
    export = ["export", str(sdxl_concept), "--out", str(out), "--json", "--format", format, "--rank", "full"]
    result = runner.invoke(app, [*export, "--token", "sks-kitty"])
    assert result.exit_code == 0, result.output
    if format == "diffusers":
        embedding_file, lora_file = out / "learned_embeds.safetensors", out / "pytorch_lora_weights.safetensors"
        assert "StableDiffusionXLPipeline" in (out / "README.md").read_text()
    else:
        embedding_file, lora_file = out / "sks-kitty.safetensors", out / "sks-kitty-lora.safetensors"
    embedding = load_file(embedding_file)
    assert sorted(embedding) == ["clip_g", "clip_l"]
    assert embedding["clip_l"].shape == (1, 32) and embedding["clip_g"].shape == (1, 32)

    pipe = sdxl_pipeline(tiny_sdxl)
    pipe.load_textual_inversion(
        embedding["clip_l"], token="sks-kitty", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        embedding["clip_g"], token="sks-kitty", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    embedding_only = draw_plain(pipe, "a photo of sks-kitty in a box")
    pipe.load_lora_weights(str(out), weight_name=lora_file.name)
    exported = draw_plain(pipe, "a photo of sks-kitty in a box")
    fixed = torch.cat([embedding["clip_l"], embedding["clip_g"]], dim=-1)
    native = draw_e4t(sdxl_concept, tiny_sdxl, "a photo of S* in a box", fixed)

    difference = np.abs(exported - native).max()
    assert difference < 0.02, difference  # fp16 LoRA factors; e4t forms W * (1 + dW) in fp32
    assert np.abs(embedding_only - native).max() > 10 * difference  # the LoRA carries the offsets


@pytest.mark.slow
def test_two_processes_pretrain_an_sdxl_domain_as_one_does(tiny_sdxl, tiny_backbone, photo_folder, tmp_path):
    """DDP over gloo, launched through accelerate, on the SDXL family: same global batch, same weights."""
    import os
    import subprocess
    import sys

    common = [
        "pretrain", "--domain", "cats", "--data", str(photo_folder), "--base-model", str(tiny_sdxl),
        "--backbone", str(tiny_backbone), "--steps", "2", "--batch-size", "4", "--resolution", "64",
        "--encoder-hidden-dim", "32", "--device", "cpu", "--json",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert runner.invoke(app, [*common, "--out", str(one)]).exit_code == 0
    process = subprocess.run(
        [sys.executable, "-m", "e4tcli", *common, "--out", str(two), "--num-processes", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == 0, process.stderr
    a, b = (load_file(str(run / "checkpoint-0000002" / "model.safetensors")) for run in (one, two))
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    assert difference < 1e-6, difference
    assert max(t.abs().max().item() for k, t in a.items() if k.startswith("offsets.")) > 0  # they trained
