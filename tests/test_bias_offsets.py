"""Bias changes (``e4t tune --bias-lr``): what the hooks add equals changing the base model's own parameters."""

import json

import torch
from safetensors.torch import load_file

from e4tcli.io.concept import load_concept, save_concept
from e4tcli.models.bias_offsets import PREFIX, BiasOffsets, bias_targets, change_size
from e4tcli.models.e4t import E4TModel
from e4tcli.models.loading import load_base_model
from e4tcli.models.weight_offsets import OffsetConv2d
from tests.test_model import build, unet_inputs


def random_changes(unet, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    changes = {}
    for name, module in bias_targets(unet).items():
        changes[name] = 0.05 * torch.randn(change_size(module), generator=g)
    return changes


def test_the_hooks_draw_what_changing_the_parameters_in_place_draws(tiny_sd):
    model = build(tiny_sd, kind="lowrank", layers="attention+resnets")
    targets = bias_targets(model.unet)
    assert any(isinstance(m, OffsetConv2d) for m in targets.values())  # a wrapped layer stands for its bias
    assert any(isinstance(m, torch.nn.GroupNorm) for m in targets.values())
    changes = random_changes(model.unet)
    latents, t, states = unet_inputs()

    reference = load_base_model(str(tiny_sd)).unet
    with torch.no_grad():
        parameters = dict(reference.named_parameters())
        for name, change in changes.items():
            parameters[name].add_(change)
        expected = reference(latents, t, encoder_hidden_states=states).sample
        BiasOffsets(model.unet, changes)
        actual = model.unet(latents, t, encoder_hidden_states=states).sample
    assert torch.allclose(actual, expected, atol=1e-5)
    assert not torch.allclose(
        actual, load_base_model(str(tiny_sd)).unet(latents, t, encoder_hidden_states=states).sample
    )


def test_fresh_changes_leave_the_unet_exactly_unchanged_and_removing_them_restores_it(tiny_sd):
    model = build(tiny_sd, kind="lowrank", layers="attention+resnets")
    latents, t, states = unet_inputs()
    with torch.no_grad():
        before = model.unet(latents, t, encoder_hidden_states=states).sample
        model.start_bias_offsets()
        fresh = model.unet(latents, t, encoder_hidden_states=states).sample
        for change in model.biases.parameters():
            change.fill_(0.1)
        changed = model.unet(latents, t, encoder_hidden_states=states).sample
        model.remove_bias_offsets()
        after = model.unet(latents, t, encoder_hidden_states=states).sample
    assert torch.equal(fresh, before) and torch.equal(after, before)
    assert not torch.allclose(changed, before)


def test_a_concept_file_carries_the_changes_to_generation(tiny_sd, tmp_path):
    model = build(tiny_sd, kind="lowrank", layers="attention+resnets")
    model.start_bias_offsets()
    with torch.no_grad():
        for change in model.biases.parameters():
            change.normal_(0, 0.05)
    features = torch.randn(1, 2, 32)
    path = tmp_path / "c.safetensors"
    save_concept(path, model.concept_state_dict(features), {}, "fp32")
    tensors = load_concept(path).tensors
    assert sum(k.startswith(PREFIX) for k in tensors) == len(bias_targets(model.unet))

    loaded = E4TModel(
        load_base_model(str(tiny_sd)),
        "cat",
        model.encoder_config,
        model.offset_config,
        model.placement,
        concept_tensors=tensors,
    )
    latents, t, states = unet_inputs()
    with torch.no_grad():
        assert torch.equal(
            loaded.unet(latents, t, encoder_hidden_states=states).sample,
            model.unet(latents, t, encoder_hidden_states=states).sample,
        )


def test_tune_with_bias_lr_stores_the_changes_and_export_carries_them_in_the_diffusers_layout(tmp_path):
    from e4t_minifaces import EXAMPLES
    from typer.testing import CliRunner

    from e4tcli.cli import app
    from e4tcli.io.concept import read_concept_info

    runner = CliRunner()
    concept = tmp_path / "mira.safetensors"
    tune = ["tune", str(EXAMPLES / "mira.png"), "--domain", "minifaces", "--steps", "1", "--out", str(concept)]
    assert runner.invoke(app, [*tune, "--bias-lr", "1e-2"]).exit_code == 0
    tensors = load_concept(concept).tensors
    changes = {k: v for k, v in tensors.items() if k.startswith(PREFIX)}
    assert changes and all(v.abs().max() > 0 for v in changes.values())  # one Adam step moves every change
    assert read_concept_info(concept)["tuning"]["bias_learning_rate"] == 1e-2

    result = runner.invoke(app, ["export", str(concept), "--format", "kohya", "--out", str(tmp_path / "x"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bias_changes_left_out"] == sum(v.numel() for v in changes.values())

    # diffusers: the README's recipe adds each exported change to the plain UNet's parameter of that name
    folder = tmp_path / "d"
    result = runner.invoke(app, ["export", str(concept), "--format", "diffusers", "--out", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bias_changes_left_out"] == 0
    readme = (folder / "README.md").read_text()
    assert readme.index("bias_changes.safetensors") < readme.index("load_lora_weights")
    exported = load_file(str(folder / "bias_changes.safetensors"))
    unet = load_base_model(str(EXAMPLES.parent / "weights" / "base")).unet
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    for name, change in exported.items():
        unet.get_parameter(name).data += change.to(unet.dtype)
    for name, change in changes.items():
        moved = unet.get_parameter(name.removeprefix(PREFIX)) - before[name.removeprefix(PREFIX)]
        assert torch.allclose(moved.flatten(), change.float().flatten(), atol=1e-3), name

    plain = tmp_path / "plain.safetensors"  # minifaces tunes the changes by default: 0 turns them off
    tune[-1] = str(plain)
    assert runner.invoke(app, [*tune, "--bias-lr", "0"]).exit_code == 0
    assert not any(k.startswith(PREFIX) for k in load_concept(plain).tensors)
    assert read_concept_info(plain)["tuning"]["bias_learning_rate"] is None
    # an export into the same folder must not leave the other concept's changes beside its files
    again = ["export", str(plain), "--format", "diffusers", "--out", str(folder)]
    assert runner.invoke(app, again).exit_code == 2  # an earlier export is there: --force is needed
    assert runner.invoke(app, [*again, "--force"]).exit_code == 0
    assert not (folder / "bias_changes.safetensors").exists()
    result = runner.invoke(app, ["export", str(plain), "--format", "kohya", "--out", str(tmp_path / "y"), "--json"])
    assert json.loads(result.stdout)["bias_changes_left_out"] == 0


def test_the_sdxl_readme_adds_the_bias_changes_before_the_lora_on_the_unets_device():
    from types import SimpleNamespace

    from e4tcli.export import diffusers_readme, export_file_names
    from e4tcli.models.family import SDXL

    family = SimpleNamespace(name=SDXL, pipeline_class="StableDiffusionXLPipeline", label="Stable Diffusion XL")
    info = {"domain": "art", "base_model": {"source": "owner/sdxl", "fingerprint": "0" * 16}}
    readme = diffusers_readme("tok", info, export_file_names("diffusers", "tok", bias_changes=True), family)
    code = readme.split("```python\n")[1].split("```")[0]
    compile(code, "readme", "exec")
    assert code.count("from safetensors.torch import load_file") == 1
    assert code.index("bias_changes.safetensors") < code.index("load_lora_weights")
    assert "change.to(parameter.device, parameter.dtype)" in code


def test_pretrained_bias_changes_resume_exactly_and_are_where_tuning_starts(
    tmp_path, tiny_sd, tiny_backbone, photo_folder
):
    from typer.testing import CliRunner

    from e4tcli.cli import app
    from e4tcli.io.concept import read_concept_info
    from tests.test_pretrain_robust import losses

    runner = CliRunner()
    common = ["--domain", "cats", "--data", str(photo_folder), "--base-model", str(tiny_sd)]
    common += ["--backbone", str(tiny_backbone), "--batch-size", "2", "--resolution", "64"]
    common += ["--encoder-hidden-dim", "32", "--device", "cpu", "--bias-lr", "1e-2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert runner.invoke(app, ["pretrain", *common, "--out", str(straight), "--steps", "3"]).exit_code == 0
    assert runner.invoke(app, ["pretrain", *common, "--out", str(split), "--steps", "1"]).exit_code == 0
    resumed = runner.invoke(app, ["pretrain", *common, "--out", str(split), "--steps", "3", "--resume", "latest"])
    assert resumed.exit_code == 0, resumed.output
    checkpoint = straight / "checkpoint-0000003"
    mismatched = runner.invoke(
        app, ["pretrain", *common[:-2], "--out", str(split), "--steps", "4", "--resume", "latest"]
    )
    assert mismatched.exit_code == 2 and "this run does not" in mismatched.output
    plain = tmp_path / "plain"
    assert runner.invoke(app, ["pretrain", *common[:-2], "--out", str(plain), "--steps", "1"]).exit_code == 0
    mismatched = runner.invoke(app, ["pretrain", *common, "--out", str(plain), "--steps", "2", "--resume", "latest"])
    assert mismatched.exit_code == 2 and "--bias-lr 0" in mismatched.output
    domain = load_file(str(checkpoint / "model.safetensors"))
    again = load_file(str(split / "checkpoint-0000003" / "model.safetensors"))
    assert losses(split) == losses(straight)
    assert domain.keys() == again.keys() and all(torch.equal(domain[k], again[k]) for k in domain)
    pretrained = {k: v for k, v in domain.items() if k.startswith(PREFIX)}
    unet = load_base_model(str(tiny_sd)).unet
    assert set(pretrained) == {PREFIX + name for name in bias_targets(unet)}
    assert all(v.abs().max() > 0 for v in pretrained.values())  # three Adam steps move every change
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["training"]["bias_learning_rate"] == 1e-2

    image = str(photo_folder / "chelsea.png")
    tune = ["tune", image, "--checkpoint", str(checkpoint), "--base-model", str(tiny_sd), "--backbone"]
    tune += [str(tiny_backbone), "--domain", "cats", "--steps", "1", "--device", "cpu"]
    frozen, tuned = tmp_path / "frozen.safetensors", tmp_path / "tuned.safetensors"
    assert runner.invoke(app, [*tune, "--bias-lr", "0", "--out", str(frozen)]).exit_code == 0
    assert runner.invoke(app, [*tune, "--bias-lr", "1e-3", "--out", str(tuned)]).exit_code == 0
    kept, moved = load_concept(frozen).tensors, load_concept(tuned).tensors
    assert read_concept_info(frozen)["tuning"]["bias_learning_rate"] is None
    assert all(torch.equal(kept[k], v.half()) for k, v in pretrained.items())  # the domain's (stored fp16), untouched
    steps = [(moved[k].float() - v).abs().max().item() for k, v in pretrained.items()]
    assert 0 < max(steps) and max(steps) < 2e-3  # one step of 1e-3 from the domain's, not from zero
