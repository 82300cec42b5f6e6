"""The E4T model on a tiny SD: zero-init exactness, gradients, the placeholder."""

import pytest
import torch

from e4tcli.device import choose_placement
from e4tcli.models.e4t import E4TModel, unet_channels
from e4tcli.models.encoder import EncoderConfig
from e4tcli.models.loading import load_base_model
from e4tcli.models.weight_offsets import OffsetConfig, OffsetConv2d, OffsetLinear
from e4tcli.training.step import Batch, training_step


def build(tiny_sd, kind="paper", layers="attention", concept_tensors=None):
    base = load_base_model(str(tiny_sd))
    config = EncoderConfig(
        backbone_hidden_size=32,
        backbone_layers=(2, 4),
        unet_channels=unet_channels(base.unet),
        embedding_dim=base.text_encoder.get_input_embeddings().weight.shape[1],
        hidden_dim=48,
    )
    offsets = OffsetConfig(kind=kind, rank=2, layers=layers)
    return E4TModel(base, "cat", config, offsets, choose_placement("cpu"), concept_tensors=concept_tensors)


def unet_inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(batch, 77, 32, generator=g)


def test_every_offset_kind_users_may_choose_has_its_class():
    from e4tcli.domain import OFFSET_KINDS
    from e4tcli.models.weight_offsets import OFFSET_CLASSES

    assert tuple(OFFSET_CLASSES) == OFFSET_KINDS


@pytest.mark.parametrize("kind", ["paper", "lowrank"])
def test_fresh_offsets_leave_the_unet_exactly_unchanged(tiny_sd, kind):
    base = load_base_model(str(tiny_sd))
    latents, t, states = unet_inputs()
    with torch.no_grad():
        expected = base.unet(latents, t, encoder_hidden_states=states).sample
    model = build(tiny_sd, kind)
    assert len(model.offsets) == 3 * 14  # q, k, v of 7 self- and 7 cross-attention layers
    with torch.no_grad():
        actual = model.unet(latents, t, encoder_hidden_states=states).sample
    assert torch.equal(actual, expected)


def test_offsets_change_the_output_once_trained(tiny_sd):
    model = build(tiny_sd)
    latents, t, states = unet_inputs()
    with torch.no_grad():
        before = model.unet(latents, t, encoder_hidden_states=states).sample
        for layer in model.offsets.values():
            layer.offset.row_map.weight.fill_(0.01)
        after = model.unet(latents, t, encoder_hidden_states=states).sample
    assert not torch.allclose(before, after)


def test_offset_is_elementwise_modulation_of_the_weight(tiny_sd):
    model = build(tiny_sd)
    layer: OffsetLinear = next(iter(model.offsets.values()))
    with torch.no_grad():
        layer.offset.row_map.weight.normal_()
    x = torch.randn(3, layer.base_layer.in_features)
    delta = layer.delta()
    expected = x @ (layer.base_layer.weight * (1 + delta)).T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer.squared_norm(), (delta**2).sum(), rtol=1e-4)
    column, row = layer.offset.factors()
    assert column.shape == (layer.base_layer.out_features, 1) and row.shape == (layer.base_layer.in_features, 1)


def test_resnet_offsets_modulate_each_convolution_channel_pair_and_survive_a_concept_round_trip(tiny_sd):
    latents, t, states = unet_inputs()
    base = load_base_model(str(tiny_sd))
    with torch.no_grad():
        expected = base.unet(latents, t, encoder_hidden_states=states).sample
    model = build(tiny_sd, layers="attention+resnets")
    convs = {name: layer for name, layer in model.offsets.items() if isinstance(layer, OffsetConv2d)}
    resnets = [m for m in model.unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert len(convs) == 2 * len(resnets) > 0 and len(model.offsets) - len(convs) == 3 * 14
    with torch.no_grad():
        assert torch.equal(model.unet(latents, t, encoder_hidden_states=states).sample, expected)
        for layer in model.offsets.values():
            layer.offset.row_map.weight.normal_(std=0.05)
        tuned = model.unet(latents, t, encoder_hidden_states=states).sample
    assert not torch.allclose(tuned, expected)

    name, layer = next(iter(convs.items()))
    conv = layer.base_layer
    x = torch.randn(2, conv.in_channels, 8, 8)
    delta = layer.delta()
    weight = conv.weight * (1 + delta[:, :, None, None])
    assert torch.allclose(
        layer(x), torch.nn.functional.conv2d(x, weight, conv.bias, conv.stride, conv.padding), atol=1e-5
    )
    conv.padding_mode = "reflect"  # the wrapper honours the wrapped layer's own padding
    reflected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), weight, conv.bias)
    assert torch.allclose(layer(x), reflected, atol=1e-5)
    conv.padding_mode = "zeros"

    concept = model.concept_state_dict(torch.randn(1, 2, 32))
    generation = build(tiny_sd, layers="attention+resnets", concept_tensors=concept)
    assert f"offsets.{name}.column" in concept
    with torch.no_grad():
        assert torch.equal(generation.unet(latents, t, encoder_hidden_states=states).sample, tuned)


def test_fresh_encoder_gives_exactly_the_class_word_embedding(tiny_sd):
    model = build(tiny_sd)
    latents, t, _ = unet_inputs()
    class_states = model.encode_text(model.tokenize(["a photo of a cat"] * 2))
    concept, offset = model.concept_embedding(torch.randn(2, 2, 32), latents, t, class_states)
    cat_id = model.tokenizer("cat", add_special_tokens=False).input_ids[0]
    word = model.placeholder.base.weight[cat_id]
    assert torch.equal(offset, torch.zeros_like(offset))
    assert torch.equal(concept, word.expand(2, -1))
    # ... and so "a photo of S*" encodes exactly like "a photo of cat"
    with torch.no_grad():
        with_placeholder = model.encode_text(model.tokenize(["a photo of S*"]), concept=concept[:1])
        with_word = model.encode_text(model.tokenize(["a photo of cat"]))
    assert torch.equal(with_placeholder, with_word)


def test_placeholder_is_one_added_token_and_the_embedding_table_is_untouched(tiny_sd):
    model = build(tiny_sd)
    ids = model.tokenize(["a photo of S*"])[0].tolist()
    assert ids[:6] == [49406, 320, 1125, 539, model.placeholder.placeholder_id, 49407]
    assert model.placeholder.base.weight.shape[0] == 49408
    concept = torch.randn(1, 32)
    embeddings = model.placeholder(torch.tensor([ids]))
    with model.placeholder.using(concept):
        swapped = model.placeholder(torch.tensor([ids]))
    assert torch.equal(swapped[0, 4], concept[0])
    assert torch.equal(swapped[0, :4], embeddings[0, :4])


def test_gradients_reach_only_encoder_and_offsets(tiny_sd):
    model = build(tiny_sd)
    with torch.no_grad():  # make every trainable path live (the zero-init maps block some gradients at step 0)
        model.encoder.head[-1].weight.normal_(std=0.01)
        for layer in model.offsets.values():
            layer.offset.row_map.weight.normal_(std=0.01)
    g = torch.Generator().manual_seed(0)
    batch = Batch(
        latents=torch.randn(2, 4, 8, 8, generator=g),
        image_features=torch.randn(2, 2, 32, generator=g),
        prompt_ids=model.tokenize(["a photo of S*"] * 2),
        class_prompt_ids=model.tokenize(["a photo of cat"] * 2),
    )
    from diffusers import DDPMScheduler

    losses = training_step(model, batch, DDPMScheduler.from_config(model.base.scheduler_config), 0.1, 0.1, g)
    losses.total.backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    for p in model.trainable_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0
    for module in (model.unet, model.text_encoder, model.vae):
        for p in module.parameters():
            if id(p) not in trainable:
                assert p.grad is None and not p.requires_grad


def live_encoder(model, seed=0):
    """Give every encoder weight random values, so that a fold that dropped or swapped a part would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.2)


def test_a_concept_encoder_folded_on_its_reference_computes_what_the_domain_encoder_does(tiny_sd):
    from e4tcli.models.encoder import ConceptEncoder

    model = build(tiny_sd)
    live_encoder(model)
    reference, other = torch.randn(2, 1, 2, 32, generator=torch.Generator().manual_seed(1))
    features = torch.randn(3, sum(model.encoder_config.unet_channels))
    folded = ConceptEncoder.fold(model.encoder, reference)
    with torch.no_grad():
        whole = model.encoder(reference.expand(3, -1, -1), features)
        assert whole.abs().max() > 0.1
        assert torch.allclose(folded(features), whole, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(folded(features), model.encoder(other.expand(3, -1, -1), features), atol=1e-3)
    assert sum(p.numel() for p in folded.state_dict().values()) < sum(p.numel() for p in model.encoder.parameters())


def test_a_version_1_concept_with_the_whole_encoder_still_generates_the_same(tiny_sd, tmp_path):
    """Concept files written before the fold held the whole encoder and the reference's features."""
    import json

    from safetensors.torch import save_file

    from e4tcli.io.concept import load_concept, save_concept

    model = build(tiny_sd)
    live_encoder(model)
    reference = torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(2))
    old = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    old |= {k: v for k, v in model.concept_state_dict(reference).items() if k.startswith("offsets.")}
    old["image_features"] = reference[0]
    info = {"class_word": "cat"}
    save_file(
        old,
        str(tmp_path / "v1.safetensors"),
        metadata={"format": "e4t-concept", "version": "1", "e4t": json.dumps(info)},
    )
    save_concept(tmp_path / "v2.safetensors", model.concept_state_dict(reference), info, precision="fp32")
    latents, t, states = unet_inputs(batch=1)
    t = t[:1]
    embeddings = []
    for name in ("v1", "v2"):
        generation = build(tiny_sd, concept_tensors=load_concept(tmp_path / f"{name}.safetensors").tensors)
        with torch.no_grad():
            embeddings.append(generation.concept_embedding(None, latents, t, states)[0])
    with torch.no_grad():
        direct = model.concept_embedding(reference, latents, t, states)[0]
    assert not torch.allclose(direct, model.class_embedding().expand(1, -1), atol=1e-3)
    assert torch.allclose(embeddings[0], direct, atol=1e-5) and torch.allclose(embeddings[1], direct, atol=1e-5)
