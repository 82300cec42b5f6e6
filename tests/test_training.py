"""Tuning and pre-training on the tiny model: what changes, what doesn't, what round-trips."""

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from e4tcli import api
from e4tcli.device import choose_placement
from e4tcli.io.checkpoint import load_checkpoint
from e4tcli.io.concept import load_concept
from e4tcli.models.e4t import E4TModel
from e4tcli.models.encoder import EncoderConfig
from e4tcli.models.loading import backbone_features, load_backbone, load_base_model
from e4tcli.models.weight_offsets import OffsetConfig, offset_parameters
from e4tcli.training.images import latent_distribution, square_resize, to_pixels
from e4tcli.training.step import Batch, training_step
from e4tcli.training.tune import TuneSettings, tune_concept


def model_from_checkpoint(checkpoint_dir, base_source):
    checkpoint = load_checkpoint(checkpoint_dir)
    base = load_base_model(base_source)
    model = E4TModel(
        base,
        "cat",
        EncoderConfig.from_dict(checkpoint.config["encoder"]),
        OffsetConfig(**checkpoint.config["offsets"]),
        choose_placement("cpu"),
    )
    model.load_trainable_state_dict(checkpoint.tensors)
    return model, checkpoint


def fixed_loss(model, image, features, seed=123):
    """The loss on one image with fixed noise and timesteps, for before/after comparisons."""
    mean, _ = latent_distribution(model.vae, to_pixels([square_resize(image, 64)] * 8))
    g = torch.Generator().manual_seed(seed)
    batch = Batch(
        latents=mean,
        image_features=features.expand(8, -1, -1),
        prompt_ids=model.tokenize(["a photo of S*"] * 8),
        class_prompt_ids=model.tokenize(["a photo of cat"] * 8),
    )
    with torch.no_grad():
        scheduler = DDPMScheduler.from_config(model.base.scheduler_config)
        return float(training_step(model, batch, scheduler, 0.0, 0.0, g).denoising)


def test_checkpoint_round_trip_is_exact(tiny_checkpoint, tiny_sd):
    model, checkpoint = model_from_checkpoint(tiny_checkpoint, str(tiny_sd))
    state = model.trainable_state_dict()
    assert state.keys() == checkpoint.tensors.keys()
    assert all(torch.equal(state[k], checkpoint.tensors[k]) for k in state)
    config = checkpoint.config
    assert config["domain"] == "cats" and config["step"] == 2
    assert config["training"]["batch_size"] == 2 and config["training"]["resolution"] == 64
    assert len(config["base_model"]["fingerprint"]) == 16 and config["backbone"]["source"]
    # pre-training moved the zero-initialised maps
    assert any(torch.count_nonzero(v) for k, v in state.items() if k.endswith("row_map.weight"))


def test_tuning_lowers_the_loss_and_leaves_base_weights_bit_identical(
    tiny_checkpoint, tiny_sd, tiny_backbone, photo_folder
):
    model, _ = model_from_checkpoint(tiny_checkpoint, str(tiny_sd))
    frozen = {
        name: p.detach().clone()
        for module in (model.unet, model.text_encoder, model.vae)
        for name, p in module.named_parameters()
        if not p.requires_grad
    }
    image = Image.open(photo_folder / "chelsea.png").convert("RGB")
    features = backbone_features(load_backbone(str(tiny_backbone)), [square_resize(image, 64)], (2, 4))
    before = fixed_loss(model, image, features)
    settings = TuneSettings(
        steps=30, learning_rate=1e-2, batch_size=4, resolution=64, lambda_emb=0.1, lambda_weights=1e-4
    )
    scheduler = DDPMScheduler.from_config(model.base.scheduler_config)
    history = tune_concept(model, image, features, ("a photo of S*",), settings, scheduler)
    after = fixed_loss(model, image, features)
    assert len(history) == 30
    assert after < 0.96 * before, (before, after)  # seen: 1.061 -> 0.986 (-7%)
    current = {
        name: p for module in (model.unet, model.text_encoder, model.vae) for name, p in module.named_parameters()
    }
    assert all(torch.equal(current[name], value) for name, value in frozen.items())


def test_offsets_take_their_own_learning_rate(tiny_checkpoint, tiny_sd, tiny_backbone, photo_folder):
    """Adam's first step moves every parameter with a gradient by its group's rate, so the largest move of
    the encoder and of the offsets each equals the rate they were given."""
    model, _ = model_from_checkpoint(tiny_checkpoint, str(tiny_sd))
    image = Image.open(photo_folder / "chelsea.png").convert("RGB")
    features = backbone_features(load_backbone(str(tiny_backbone)), [square_resize(image, 64)], (2, 4))
    encoder_before = [p.detach().clone() for p in model.encoder.parameters()]
    offsets_before = [p.detach().clone() for p in offset_parameters(model.offsets)]
    settings = TuneSettings(
        steps=1,
        learning_rate=1e-4,
        batch_size=2,
        resolution=64,
        lambda_emb=0.1,
        lambda_weights=1e-4,
        offset_learning_rate=1e-2,
    )
    tune_concept(
        model, image, features, ("a photo of S*",), settings, DDPMScheduler.from_config(model.base.scheduler_config)
    )

    def largest_move(before, after):
        return max(float((b - a.detach()).abs().max()) for b, a in zip(before, after))

    assert largest_move(encoder_before, model.encoder.parameters()) == pytest.approx(1e-4, rel=0.01)
    assert largest_move(offsets_before, offset_parameters(model.offsets)) == pytest.approx(1e-2, rel=0.01)


def test_concept_round_trip_reproduces_the_tuned_model_exactly(
    tiny_checkpoint, tiny_sd, photo_folder, cats_domain, tmp_path
):
    out = tmp_path / "chelsea.safetensors"
    result = api.tune(
        api.TuneOptions(
            image=str(photo_folder / "chelsea.png"),
            checkpoint=str(tiny_checkpoint),
            out=str(out),
            steps=2,
            batch_size=2,
            seed=3,
        ),
        cats_domain,
    )
    assert result.concept == out and out.stat().st_size == result.size_bytes
    concept = load_concept(out)
    info = concept.info
    assert info["domain"] == "cats" and info["token"] == "S*" and info["class_word"] == "cat"
    assert info["tuning"]["steps"] == 2 and info["tuning"]["seed"] == 3
    assert concept.tensors["encoder.reference"].shape == (info["encoder"]["hidden_dim"],), "folded to one vector"
    assert not any("image_layers" in k for k in concept.tensors) and "image_features" not in concept.tensors
    assert not any(".row_map." in k or ".column_map." in k for k in concept.tensors), "no d x d maps in a concept"

    # re-tune identically in memory and compare the tuned model with the one loaded from the file
    placement = choose_placement("cpu")
    loaded = E4TModel(
        load_base_model(str(tiny_sd)),
        "cat",
        EncoderConfig.from_dict(info["encoder"]),
        OffsetConfig(**info["offsets"]),
        placement,
        concept.tensors,
    )
    tuned, _ = model_from_checkpoint(tiny_checkpoint, str(tiny_sd))
    tuned_state = tuned.concept_state_dict(torch.randn(1, 2, 32))
    assert tuned_state.keys() == concept.tensors.keys()
    g = torch.Generator().manual_seed(0)
    latents, t, states = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        from_file = loaded.unet(latents, t, encoder_hidden_states=states).sample
        from_file_concept, _ = loaded.concept_embedding(None, latents, t, states)
    # the file's tensors are exactly the tuned model's: re-run the same tuning and compare bit for bit
    again = tmp_path / "again.safetensors"
    api.tune(
        api.TuneOptions(
            image=str(photo_folder / "chelsea.png"),
            checkpoint=str(tiny_checkpoint),
            out=str(again),
            steps=2,
            batch_size=2,
            seed=3,
        ),
        cats_domain,
    )
    second = load_concept(again)
    assert all(torch.equal(second.tensors[k], concept.tensors[k]) for k in concept.tensors)
    reloaded = E4TModel(
        load_base_model(str(tiny_sd)),
        "cat",
        EncoderConfig.from_dict(info["encoder"]),
        OffsetConfig(**info["offsets"]),
        placement,
        second.tensors,
    )
    with torch.no_grad():
        assert torch.equal(reloaded.unet(latents, t, encoder_hidden_states=states).sample, from_file)
        assert torch.equal(reloaded.concept_embedding(None, latents, t, states)[0], from_file_concept)


def test_sd2_shape_with_v_prediction_tunes_and_generates(tmp_path, tiny_backbone, photo_folder, cats_domain):
    from e4tcli.tiny import build_tiny_base_model

    sd2 = build_tiny_base_model(tmp_path / "sd2", text_width=1024, prediction_type="v_prediction")
    checkpoint = tmp_path / "ckpt"
    api.pretrain(
        api.PretrainOptions(
            data=str(photo_folder),
            out=str(checkpoint),
            base_model=str(sd2),
            backbone=str(tiny_backbone),
            steps=1,
            batch_size=2,
            resolution=64,
            encoder_hidden_dim=32,
        ),
        cats_domain,
    )
    concept = tmp_path / "c.safetensors"
    api.tune(
        api.TuneOptions(
            image=str(photo_folder / "chelsea.png"), checkpoint=str(checkpoint), out=str(concept), steps=2, batch_size=2
        ),
        cats_domain,
    )
    loaded = load_concept(concept)
    assert loaded.info["encoder"]["embedding_dim"] == 1024
    assert loaded.tensors["encoder.out.weight"].shape == (1024, 32)
    result = api.generate(
        api.GenerateOptions(concept=str(concept), prompt="S* on a beach", steps=2, out=str(tmp_path / "o"))
    )
    assert Image.open(result.images[0]).size == (64, 64)


def test_gradient_checkpointing_changes_nothing_but_memory(tiny_checkpoint, photo_folder, cats_domain, tmp_path):
    concepts = []
    for flag in (False, True):
        out = tmp_path / f"c{int(flag)}.safetensors"
        api.tune(
            api.TuneOptions(
                image=str(photo_folder / "chelsea.png"),
                checkpoint=str(tiny_checkpoint),
                out=str(out),
                steps=2,
                batch_size=2,
                gradient_checkpointing=flag,
            ),
            cats_domain,
        )
        concepts.append(load_concept(out).tensors)
    plain, checkpointed = concepts
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_tuning_checkpoints_activations_by_default_only_on_cuda():
    assert api.TuneOptions(image="x").gradient_checkpointing is None
    assert api.checkpointing_by_default(torch.device("cuda")) and not api.checkpointing_by_default(torch.device("cpu"))


def test_pretraining_takes_the_domains_offsets_unless_flags_override(
    tiny_sd, tiny_backbone, photo_folder, cats_domain, tmp_path
):
    from dataclasses import replace

    from e4tcli import OffsetDefaults

    domain = replace(cats_domain, offsets=OffsetDefaults(kind="lowrank", rank=3, layers="attention+resnets"))
    common = dict(
        data=str(photo_folder),
        base_model=str(tiny_sd),
        backbone=str(tiny_backbone),
        steps=1,
        batch_size=2,
        resolution=64,
        encoder_hidden_dim=32,
    )
    from_domain = load_checkpoint(
        api.pretrain(api.PretrainOptions(out=str(tmp_path / "a"), **common), domain).checkpoint
    )
    assert from_domain.config["offsets"] == {
        "kind": "lowrank",
        "constant_dim": 64,
        "rank": 3,
        "layers": "attention+resnets",
    }
    assert any(".resnets.0.conv1." in k for k in from_domain.tensors)
    overridden = api.PretrainOptions(out=str(tmp_path / "b"), offsets="paper", offset_layers="attention", **common)
    from_flags = load_checkpoint(api.pretrain(overridden, domain).checkpoint)
    assert from_flags.config["offsets"]["kind"] == "paper" and from_flags.config["offsets"]["layers"] == "attention"
    assert not any("resnets" in k for k in from_flags.tensors)


def test_fp16_concept_is_the_fp32_one_rounded_half_the_size_and_generates_alike(
    tiny_checkpoint, tiny_sd, photo_folder, cats_domain, tmp_path
):
    concepts = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path / f"{precision}.safetensors"
        result = api.tune(
            api.TuneOptions(
                image=str(photo_folder / "chelsea.png"),
                checkpoint=str(tiny_checkpoint),
                out=str(out),
                steps=2,
                batch_size=2,
                seed=3,
                save_precision=precision,
            ),
            cats_domain,
        )
        concepts[precision] = (load_concept(out), result.size_bytes)
    (full, full_size), (half, half_size) = concepts["fp32"], concepts["fp16"]
    assert full.info["precision"] == "fp32" and half.info["precision"] == "fp16"
    assert full.tensors.keys() == half.tensors.keys()

    def tensor_bytes(concept):
        return sum(t.numel() * t.element_size() for t in concept.tensors.values())

    assert tensor_bytes(half) * 2 == tensor_bytes(full) and half_size < full_size
    for name, tensor in full.tensors.items():
        assert tensor.dtype == torch.float32 and half.tensors[name].dtype == torch.float16, name
        assert torch.equal(half.tensors[name], tensor.half()), name

    placement = choose_placement("cpu")
    outputs = []
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300])
    for concept in (full, half):
        info = concept.info
        model = E4TModel(
            load_base_model(str(tiny_sd)),
            "cat",
            EncoderConfig.from_dict(info["encoder"]),
            OffsetConfig(**info["offsets"]),
            placement,
            concept.tensors,
        )
        assert all(p.dtype == torch.float32 for p in model.encoder.parameters())
        with torch.no_grad():
            states = model.encode_text(model.tokenize(["a photo of S*"]))
            embedding, _ = model.concept_embedding(None, latents, t, states)
            outputs.append((embedding, model.unet(latents, t, encoder_hidden_states=states).sample))
    (embedding32, eps32), (embedding16, eps16) = outputs
    assert not torch.equal(eps16, eps32), "the fp16 file's values are rounded"
    assert torch.allclose(eps16, eps32, rtol=0, atol=1e-3 * eps32.abs().max().item())
    assert torch.allclose(embedding16, embedding32, rtol=0, atol=1e-2 * embedding32.abs().max().item())


def test_int8_concept_stores_encoder_matrices_in_a_byte_within_half_a_step_of_each_row(tmp_path):
    from safetensors import safe_open

    from e4tcli.io.concept import load_concept, save_concept

    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(64, 300, generator=g) * torch.logspace(-3, 1, 64)[:, None]
    tensors = {
        "encoder.unet_layer.weight": matrix,
        "encoder.reference": torch.randn(64, generator=g),
        "offsets.a.column": torch.randn(64, 1, generator=g),
    }
    sizes = {}
    for precision in ("fp16", "int8"):
        sizes[precision] = save_concept(tmp_path / f"{precision}.safetensors", tensors, {}, precision)
    with safe_open(str(tmp_path / "int8.safetensors"), framework="pt") as handle:
        assert handle.get_slice("encoder.unet_layer.weight").get_dtype() == "I8"
        assert handle.get_slice("offsets.a.column").get_dtype() == "F16"
    assert sizes["fp16"] - sizes["int8"] > 0.9 * matrix.numel()
    loaded = load_concept(tmp_path / "int8.safetensors")
    assert loaded.tensors.keys() == tensors.keys() and loaded.info["precision"] == "int8"
    error = (loaded.tensors["encoder.unet_layer.weight"] - matrix).abs().amax(dim=1)
    step = matrix.abs().amax(dim=1) / 127
    assert torch.all(error <= 0.51 * step + 1e-3 * step * 127), "each row keeps its own scale"
    assert torch.equal(loaded.tensors["encoder.reference"], tensors["encoder.reference"].half())


def test_a_tensor_fp16_cannot_hold_stays_fp32():
    from e4tcli.io.concept import stored_tensors

    stored = stored_tensors(
        {"small": torch.tensor([1.0, -2.5]), "huge": torch.tensor([1e5, 1.0]), "ids": torch.tensor([3, 4])}
    )
    assert stored["small"].dtype == torch.float16
    assert stored["huge"].dtype == torch.float32 and stored["huge"][0].item() == 1e5
    assert stored["ids"].dtype == torch.int64


def test_pretraining_prompts_come_from_pretrain_templates_filled_from_metadata(
    tiny_sd, tiny_backbone, photo_folder, cats_domain, tmp_path, monkeypatch
):
    """An image listed in metadata.jsonl gets a pre-training template with its own field; one
    not listed falls back to the tuning templates' first plain one; tuning's other templates never appear.
    The encoder is the domain's (``EncoderDefaults``) when no option overrides it."""
    import dataclasses
    import shutil

    from e4tcli import EncoderDefaults, api
    from e4tcli.io.checkpoint import load_checkpoint
    from e4tcli.training import pretrain as pretrain_module

    data = tmp_path / "data"
    shutil.copytree(photo_folder, data)
    backgrounds = {"chelsea.png": "red", "coffee.png": "dark_blue"}
    (data / "metadata.jsonl").write_text(
        "".join(f'{{"file_name": "{name}", "background": "{value}"}}\n' for name, value in backgrounds.items())
    )
    domain = dataclasses.replace(
        cats_domain,
        prompt_templates=("plain S*", "S* on gray"),
        pretrain_templates=("S* on a {background} background",),
        encoder=EncoderDefaults(hidden_dim=24, scale=0.5),
    )
    seen = []
    original = pretrain_module.make_batch

    def spy(model, mean, std, features, samples, noise_scheduler, prompts):
        seen.extend(prompts)
        return original(model, mean, std, features, samples, noise_scheduler, prompts)

    monkeypatch.setattr(pretrain_module, "make_batch", spy)
    result = api.pretrain(
        api.PretrainOptions(
            data=str(data),
            out=str(tmp_path / "run"),
            base_model=str(tiny_sd),
            backbone=str(tiny_backbone),
            steps=6,
            batch_size=4,
            resolution=64,
        ),
        domain,
    )
    encoder = load_checkpoint(result.checkpoint).config["encoder"]
    assert (encoder["hidden_dim"], encoder["scale"]) == (24, 0.5)
    assert len(seen) == 24
    assert set(seen) <= {"S* on a red background", "S* on a dark blue background", "plain S*"}
    assert {"S* on a red background", "S* on a dark blue background", "plain S*"} <= set(seen), seen
