"""Additive weight changes (``e4t tune --additive-rank``): each offset layer draws with
``W * (1 + dW) + U V^T``, and concept files carry the changes to generation."""

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from e4tcli.errors import UsageError
from e4tcli.io.concept import load_concept, save_concept
from e4tcli.models.additive_changes import AdditiveChange
from e4tcli.models.e4t import E4TModel
from e4tcli.models.loading import load_base_model
from e4tcli.models.weight_offsets import FixedOffset, LowRankOffset, OffsetConv2d, OffsetLinear
from tests.test_model import build, unet_inputs


@pytest.mark.parametrize("convolution", [False, True])
def test_a_layer_draws_with_its_modulated_weight_plus_its_change(convolution):
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, 3, padding=1) if convolution else nn.Linear(6, 5)
    x = torch.randn(2, 3, 5, 5) if convolution else torch.randn(2, 6)
    out_channels, in_channels = base.weight.shape[:2]
    fan_in = base.weight[0].numel()
    offset = LowRankOffset(out_channels, in_channels, 2)
    with torch.no_grad():
        offset.up.normal_()
    up, down = torch.randn(out_channels, 3), torch.randn(fan_in, 3)

    scale = 1 + offset.up.detach() @ offset.down.detach().T
    if convolution:
        scale = scale[:, :, None, None]
    weight = base.weight.detach() * scale + (up @ down.T).reshape(base.weight.shape)
    expected = F.conv2d(x, weight, base.bias, padding=1) if convolution else F.linear(x, weight, base.bias)

    wrapper = OffsetConv2d if convolution else OffsetLinear
    tuned = wrapper(base, offset)
    tuned.additive = AdditiveChange(up, down, trainable=True)
    drawn = tuned(x)
    assert torch.allclose(drawn, expected, atol=1e-5)
    drawn.sum().backward()
    assert tuned.additive.up.grad.abs().max() > 0 and tuned.additive.down.grad.abs().max() > 0

    stored = wrapper(base, FixedOffset(offset.up.detach(), offset.down.detach()))
    stored.additive = AdditiveChange(up, down, trainable=False)
    with torch.no_grad():
        assert torch.allclose(stored(x), expected, atol=1e-5)


def test_fresh_changes_leave_the_unet_unchanged_and_a_concept_file_carries_tuned_ones(tiny_sd, tmp_path, monkeypatch):
    model = build(tiny_sd, kind="lowrank", layers="attention+resnets")
    latents, t, states = unet_inputs()

    def unet(m):
        with torch.no_grad():
            return m.unet(latents, t, encoder_hidden_states=states).sample

    before = unet(model)
    parameters = model.start_additive_changes(2)
    assert len(parameters) == 2 * len(model.offsets)
    assert torch.equal(unet(model), before)  # U starts at zero
    with torch.no_grad():
        for layer in model.offsets.values():
            layer.additive.up.normal_(0, 0.05)
    changed = unet(model)
    assert not torch.allclose(changed, before)

    features = torch.randn(1, 2, 32)
    path = tmp_path / "c.safetensors"
    save_concept(path, model.concept_state_dict(features), {}, "fp32")
    tensors = load_concept(path).tensors
    name, layer = next((n, la) for n, la in model.offsets.items() if isinstance(la, OffsetConv2d))
    assert tensors[f"additive.{name}.down"].shape == (layer.base_layer.weight[0].numel(), 2)  # the whole kernel

    def loaded(concept_tensors):
        return E4TModel(
            load_base_model(str(tiny_sd)),
            "cat",
            model.encoder_config,
            model.offset_config,
            model.placement,
            concept_tensors,
        )

    assert torch.allclose(unet(loaded(tensors)), changed, atol=1e-6)
    without = {k: v for k, v in tensors.items() if not k.startswith("additive.")}
    assert torch.allclose(unet(loaded(without)), before, atol=1e-6)  # the changes are what differs

    # int8 (tune's default): the factors in 8 bits with a scale per row; an older e4t must refuse the file
    small = tmp_path / "small.safetensors"
    save_concept(small, model.concept_state_dict(features), {}, "int8")
    with safe_open(str(small), framework="pt") as handle:
        assert handle.get_tensor(f"additive.{name}.up").dtype == torch.int8
        assert handle.metadata()["version"] == "3"
    drawn = unet(loaded(load_concept(small).tensors))
    assert (drawn - changed).abs().max() < 0.05 * (changed - before).abs().max()
    save_concept(tmp_path / "plain.safetensors", without, {}, "int8")
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as handle:
        assert handle.metadata()["version"] == "2"  # what every older e4t reads in full
    import e4tcli.io.concept as concept_format

    monkeypatch.setattr(concept_format, "VERSION", 2)  # an e4t from before the additive changes
    concept_format.read_concept_info(tmp_path / "plain.safetensors")
    with pytest.raises(UsageError, match="newer e4t"):
        concept_format.read_concept_info(small)
    monkeypatch.undo()

    tensors[f"additive.{name}.up"] = tensors[f"additive.{name}.up"][:-1]
    with pytest.raises(UsageError, match="additive weight changes do not match"):
        loaded(tensors)


def test_tune_with_additive_rank_stores_every_layers_tuned_change(tmp_path):
    from e4t_minifaces import EXAMPLES
    from typer.testing import CliRunner

    from e4tcli.cli import app
    from e4tcli.io.concept import read_concept_info

    runner = CliRunner()
    concept = tmp_path / "mira.safetensors"
    tune = ["tune", str(EXAMPLES / "mira.png"), "--domain", "minifaces", "--steps", "1", "--out", str(concept)]
    result = runner.invoke(app, [*tune, "--additive-rank", "2", "--additive-lr", "1e-2"])  # int8, as by default
    assert result.exit_code == 0, result.output
    tensors = load_concept(concept).tensors
    layers = {k.removeprefix("offsets.").removesuffix(".column") for k in tensors if k.endswith(".column")}
    ups = {k.removeprefix("additive.").removesuffix(".up"): v for k, v in tensors.items() if k.endswith(".up")}
    assert set(ups) == layers and all(up.shape[1] == 2 for up in ups.values())
    # Adam's first step moves every value with a gradient by the rate: U, which started at zero, is at 1e-2
    # (int8 rounds the largest of a row to within its fp16 scale)
    assert max(float(up.abs().max()) for up in ups.values()) == pytest.approx(1e-2, rel=0.01)
    assert read_concept_info(concept)["tuning"]["additive_rank"] == 2
    info = runner.invoke(app, ["concept", "info", str(concept)])
    assert "additive: rank 2" in info.stdout

    for turned_off in (["--additive-rank", "0"], ["--additive-rank", "2", "--steps", "0"]):  # 0 steps: none tuned
        plain = tmp_path / "plain.safetensors"
        assert runner.invoke(app, [*tune[:-1], str(plain), *turned_off, "--force"]).exit_code == 0
        assert not any(k.startswith("additive.") for k in load_concept(plain).tensors)
        assert "additive: none" in runner.invoke(app, ["concept", "info", str(plain)]).stdout
