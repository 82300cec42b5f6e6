"""The miniature world: the generator, the shipped models, the main job offline, and
the reduced quality check (E4T-5 must beat no personalization on identity)."""

import json
import random
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
from e4t_minifaces import EXAMPLES, WEIGHTS, minifaces_domain, world
from e4t_minifaces.mask import face_region
from PIL import Image
from typer.testing import CliRunner

runner = CliRunner()

STANDARD_ERRORS = 2
"""A claim holds when it clears chance by this many standard errors (about 97.5% one-sided): the bounds
below follow from what each check means, not from one observed run."""


# --------------------------------------------------------------------------- the generator
def test_identities_round_trip_and_render_deterministically():
    rng = random.Random(0)
    for _ in range(50):
        identity = world.Identity.from_index(rng.randrange(world.NUM_IDENTITIES))
        assert world.Identity.from_index(identity.index) == identity
    identity = world.Identity.from_index(1234)
    scene = world.Scene("red", "left")
    first, second = world.render(identity, scene, jitter=5), world.render(identity, scene, jitter=5)
    assert first.size == (world.RESOLUTION, world.RESOLUTION)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    other = world.Identity.from_index(1235)
    assert not np.array_equal(np.asarray(world.render(other, scene, jitter=5)), np.asarray(first))
    corner = np.asarray(first)[0, 0]
    assert np.abs(corner.astype(int) - world.BACKGROUNDS["red"]).max() <= 2


def test_training_stream_never_draws_held_out_identities():
    stream = world.samples(seed=3)
    drawn = [next(stream).identity for _ in range(700)]
    assert not any(identity.held_out for identity in drawn)
    assert len(set(drawn)) > 500
    held_out = world.samples(seed=3, held_out=True)
    assert all(next(held_out).identity.held_out for _ in range(50))


def test_captions_name_the_scene_never_the_identity():
    identity_words = {w for choices in world.IDENTITY_CHOICES.values() for w in choices}
    scene_words = {w for choices in world.SCENE_CHOICES.values() for w in choices}
    stream = world.samples(seed=4)
    for _ in range(500):
        sample = next(stream)
        words = set(sample.caption.replace(",", " ").split())
        assert world.CLASS_WORD in words
        assert not words & (identity_words - scene_words), sample.caption
        assert words & set(world.BACKGROUNDS) <= {sample.scene.background}


@pytest.mark.parametrize(
    "weights", [world.DESCRIBED_COUNT_WEIGHTS, world.FULL_DESCRIPTION_WEIGHTS], ids=["shipped", "full"]
)
def test_described_captions_name_only_true_attributes_as_often_as_asked(weights):
    """Described captions use appearance words for the face's own attributes, as many as the weights ask for
    (all it shows when it shows fewer)."""
    phrases = {
        name: {world.ATTRIBUTE_PHRASES[name](value) for value in choices}
        for name, choices in world.IDENTITY_CHOICES.items()
    }
    most = len(weights) - 1
    weights = np.array(weights) / sum(weights)
    stream = world.samples(seed=4, describe_attributes=True, description_weights=tuple(weights))
    observed, expected = np.zeros(len(weights)), np.zeros(len(weights))
    for _ in range(1000):
        sample = next(stream)
        words = set(sample.caption.replace(",", " ").split())
        assert world.CLASS_WORD in words
        assert set(re.findall(r"(\w+) background", sample.caption)) <= {sample.scene.background}
        described = {name for name, options in phrases.items() if any(p in sample.caption for p in options)}
        for name in described:  # every attribute it names is the face's own
            assert world.ATTRIBUTE_PHRASES[name](getattr(sample.identity, name)) in sample.caption, sample.caption
        assert len(described) <= most, sample.caption
        observed[len(described)] += 1
        shown = len(sample.identity.visible())  # a caption asking for more names all that shows
        for count, weight in enumerate(weights):
            expected[min(count, shown)] += weight
    assert np.abs(observed - expected).max() / 1000 < 0.05, (observed, expected)
    assert observed[0] > 50 and observed[most] > 300  # captions without a description remain; most name the most
    plain, described = (
        world.samples(seed=4),
        world.samples(seed=4, describe_attributes=True, description_weights=tuple(weights)),
    )
    for _ in range(50):  # the same images and scenes either way: only the words differ
        a, b = next(plain), next(described)
        assert (a.identity, a.scene) == (b.identity, b.scene)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


# --------------------------------------------------------------------------- the shipped models
def test_the_base_model_trains_in_the_rounds_the_build_is_given(tmp_path):
    """Each later round starts from the one before; a round of 0 steps is left out, and the build's
    defaults train three (the shipped base)."""
    from e4t_minifaces.build import BuildSettings, base_rounds

    shipped = base_rounds(BuildSettings(tmp_path))
    assert [r.steps for r in shipped] == [2500, 3000, 4000]
    assert [r.full_descriptions for r in shipped] == [False, True, True]
    assert shipped[1].lr > shipped[2].lr
    two = base_rounds(BuildSettings(tmp_path, base_polish_steps=0))
    assert [r.steps for r in two] == [2500, 3000]
    assert [r.steps for r in base_rounds(BuildSettings(tmp_path, base_refine_steps=0, base_polish_steps=0))] == [2500]


def test_shipped_weights_are_fp16_and_under_30_mb():
    from safetensors import safe_open

    files = [p for p in WEIGHTS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 30e6
    tensors = [p for p in files if p.suffix == ".safetensors"]
    assert len(tensors) >= 6  # unet, vae, text encoder, backbone, checkpoint, reader
    for path in tensors:
        with safe_open(str(path), "pt") as handle:
            dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}
        assert dtypes <= {"F16", "I64"}, (path, dtypes)


def test_domain_points_at_shipped_models_and_checkpoint():
    from e4tcli.io.checkpoint import load_checkpoint
    from e4tcli.models.loading import load_backbone, load_base_model

    domain = minifaces_domain()
    checkpoint = load_checkpoint(domain.checkpoint)
    assert checkpoint.config["domain"] == "minifaces"
    base = load_base_model(domain.base_model)
    backbone = load_backbone(domain.backbone)
    assert checkpoint.config["base_model"]["fingerprint"] == base.fingerprint
    assert checkpoint.config["backbone"]["fingerprint"] == backbone.fingerprint


def test_reader_reads_fresh_generator_images():
    from e4t_minifaces.reader import clean_accuracy, load_reader

    reader, recorded = load_reader(WEIGHTS / "reader.safetensors")
    measured = clean_accuracy(reader, seed=99, count=300)
    for name in world.LABEL_NAMES:
        assert measured[name] >= 0.9, (name, measured[name])
        assert recorded[name] >= 0.9


def test_read_names_the_attributes_images_keep_of_a_reference(capsys):
    from e4t_minifaces.evaluate import held_out_identities
    from e4t_minifaces.read import kept_attributes, main

    mira, otto = Image.open(EXAMPLES / "mira.png"), Image.open(EXAMPLES / "otto.png")
    reference, images = kept_attributes(mira, [mira, otto])
    truth = held_out_identities(3, seed=7)  # the examples are the first three of seed 7

    def visible(attributes, identity):  # a bald face shows no hair colour
        return {name: attributes[name] for name in identity.visible()}

    assert visible(reference, truth[0]) == visible(vars(truth[0]), truth[0])
    assert visible(images[0], truth[0]) == visible(reference, truth[0])
    assert visible(images[1], truth[1]) == visible(vars(truth[1]), truth[1])
    assert main([str(EXAMPLES / "mira.png"), str(EXAMPLES / "mira.png"), str(EXAMPLES / "otto.png")]) == 0
    kept = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()[1:]}
    for name, value in reference.items():
        if name in kept:
            assert kept[name] == ("2/2" if images[1][name] == value else "1/2"), name
    assert main([str(EXAMPLES / "mira.png"), "missing.png"]) == 2


# --------------------------------------------------------------------------- the main job, offline
def test_main_job_tunes_an_example_and_generates_it(tmp_path):
    from e4tcli.cli import app
    from e4tcli.io.concept import load_concept, read_concept_info

    example = EXAMPLES / "mira.png"
    concept = tmp_path / "mira.safetensors"
    result = runner.invoke(app, ["tune", str(example), "--domain", "minifaces", "--out", str(concept), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 5
    tuning = read_concept_info(concept)["tuning"]  # the domain's defaults: a batch of 4, bias changes at 3e-3,
    assert (tuning["batch_size"], tuning["bias_learning_rate"]) == (4, 3e-3)  # rank-16 additive changes
    assert (tuning["additive_rank"], tuning["additive_learning_rate"]) == (16, 3e-3)
    tensors = load_concept(concept).tensors
    assert any(name.startswith("biases.") for name in tensors) and any(name.startswith("additive.") for name in tensors)
    result = runner.invoke(
        app,
        [
            "generate",
            str(concept),
            "a S* on a red background",
            "--num-images",
            "2",
            "--steps",
            "10",
            "--out",
            str(tmp_path / "out"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    images = [Image.open(p) for p in json.loads(result.stdout)["images"]]
    assert [i.size for i in images] == [(world.RESOLUTION, world.RESOLUTION)] * 2


def test_checkpoint_whose_recorded_model_folder_moved_falls_back_to_the_domains(tmp_path):
    """The shipped checkpoint records the build machine's folders; the installed package's are used instead."""
    from e4tcli import api
    from e4tcli.io.sources import recorded_source

    moved = tmp_path / "checkpoint"
    shutil.copytree(WEIGHTS / "checkpoint", moved)
    config = json.loads((moved / "config.json").read_text())
    config["base_model"]["source"] = str(tmp_path / "gone" / "base")
    config["backbone"]["source"] = str(tmp_path / "gone" / "backbone")
    (moved / "config.json").write_text(json.dumps(config))
    options = api.TuneOptions(
        image=str(EXAMPLES / "otto.png"), checkpoint=str(moved), out=str(tmp_path / "o.safetensors"), steps=1
    )
    result = api.tune(options, minifaces_domain())
    assert result.concept.is_file()
    assert recorded_source("relative/hub-id", "fallback") == "relative/hub-id"


# --------------------------------------------------------------------------- the tuning loss mask
@pytest.mark.parametrize("background", ["gray", "red", "yellow", "pink"])
def test_loss_mask_keeps_the_face_and_drops_the_flat_background(background):
    identity = world.Identity("round", "pale", "blue", "wide", "smile", "long", "blond")
    image = world.render(identity, world.Scene(background=background))
    pixels = np.asarray(image, dtype=int)
    mask = np.asarray(face_region(image))
    assert mask.shape == pixels.shape[:2] and set(np.unique(mask)) == {0, 255}
    drawn = np.abs(pixels - world.BACKGROUNDS[background]).sum(axis=-1) > 60  # clearly not the background
    assert mask[drawn].min() == 255  # every face pixel is kept...
    assert mask[:, :2].max() == 0 and mask[:2, :].max() == 0  # ...the background beside it is not
    assert 0.1 < (mask > 0).mean() < 0.8


def test_loss_mask_keeps_the_whole_image_without_a_flat_background():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert np.asarray(face_region(noise)).min() == 255
    flat = Image.new("RGB", (32, 32), (40, 70, 200))  # nothing but background: nothing to keep
    assert np.asarray(face_region(flat)).min() == 255


def test_tune_weighs_its_loss_by_the_domains_mask(tmp_path):
    """``e4t tune`` weighs the denoising loss by the domain's mask: a mask that keeps nothing leaves no loss."""
    from e4tcli import api

    def tune_with(domain, name):
        options = api.TuneOptions(image=str(EXAMPLES / "mira.png"), out=str(tmp_path / name), steps=2)
        return [step["denoising"] for step in api.tune(options, domain).losses]

    domain = minifaces_domain()
    assert domain.loss_mask is face_region
    kept = np.asarray(face_region(Image.open(EXAMPLES / "mira.png"))) > 0
    assert 0.1 < kept.mean() < 0.8  # the demo portrait's mask keeps the face, not the whole image
    assert min(tune_with(domain, "masked.safetensors")) > 0
    keeps_nothing = replace(domain, loss_mask=lambda image: Image.new("L", image.size, 0))
    assert tune_with(keeps_nothing, "nothing.safetensors") == [0.0, 0.0]


# --------------------------------------------------------------------------- the identity margin
def _reads_showing(identities, count=4):
    """What the reader would return for ``count`` images that each show exactly these identities' attributes."""
    return [{name: np.full(count, value) for name, value in i.labels().items()} for i in identities]


def test_margin_is_zero_and_swap_one_half_when_the_reference_is_ignored():
    from e4t_minifaces.evaluate import cross_scores, held_out_identities

    identities = held_out_identities(6, seed=3)
    typical = _reads_showing([identities[0]])[0]  # every reference gets the same (first) face
    scores = cross_scores([typical] * len(identities), identities)
    assert scores.own[0] == 1.0 and scores.own.mean() > 0.3  # copying one face scores well on "own" alone...
    assert abs(scores.margin.mean()) < 1e-12  # ...but not on the margin
    assert scores.swap == 0.5


def test_margin_and_swap_reward_drawing_each_reference():
    from e4t_minifaces.evaluate import cross_scores, held_out_identities

    identities = held_out_identities(6, seed=3)
    scores = cross_scores(_reads_showing(identities), identities)
    assert np.all(scores.own == 1.0)
    assert np.all(scores.margin > 0.2)
    assert scores.swap == 1.0
    swapped = cross_scores(_reads_showing(identities[::-1]), identities)  # each drawn as another identity
    assert swapped.margin.mean() < 0 and swapped.swap < 0.5


def test_attribute_margin_names_the_attributes_that_follow_the_reference():
    from e4t_minifaces.evaluate import attribute_margins, held_out_identities

    identities = held_out_identities(8, seed=3)
    typical = _reads_showing([identities[0]])[0]
    # every image shows its own reference's skin and eyes, and the first identity's everything else
    reads = [{**typical, "skin": own["skin"], "eyes": own["eyes"]} for own in _reads_showing(identities)]
    margins = attribute_margins(reads, identities)
    assert margins["skin"] > 0.5 and margins["eyes"] > 0.5
    for name in ("head", "spacing", "mouth", "hair"):
        assert abs(margins[name]) < 1e-12, name


def test_the_bias_method_draws_with_the_tuned_changes_and_leaves_the_shared_model_as_it_was():
    """The world's model is shared by every identity: neither bias changes nor additive changes stay on it."""
    from e4t_minifaces.evaluate import EvalSettings, World, held_out_identities, run_e4t, run_e4t_with_biases

    w = World(WEIGHTS)
    unet = w.e4t_model().unet
    hooks_before = sum(len(m._forward_hooks) for m in unet.modules())
    settings = EvalSettings(identities=1, seeds_per_prompt=1, backgrounds=("red",), sampling_steps=3)
    identity = held_out_identities(1, seed=3)[0]

    with_biases, _, size_with = run_e4t_with_biases(w, identity, settings, steps=2)
    plain, _, size = run_e4t(w, identity, replace(settings, bias_learning_rate=0), steps=2)

    assert not np.array_equal(np.asarray(with_biases[0]), np.asarray(plain[0]))
    assert size_with > size
    assert not any(getattr(module, "additive", None) is not None for module in unet.modules())
    assert w.e4t_model().biases is None
    assert sum(len(m._forward_hooks) for m in unet.modules()) == hooks_before


# --------------------------------------------------------------------------- the reduced quality check
@pytest.fixture(scope="module")
def quality_scores():
    from e4t_minifaces.evaluate import EvalSettings, World, evaluate

    settings = EvalSettings(identities=8, seeds_per_prompt=1, backgrounds=("red", "blue"), sampling_steps=20)
    scores = {s.method: s for s in evaluate(World(WEIGHTS), ["base", "e4t-5"], settings)}
    return {**scores, "images": settings.identities * settings.seeds_per_prompt * len(settings.backgrounds)}


@pytest.mark.slow
def test_e4t_five_steps_draws_each_reference_not_a_typical_face(quality_scores):
    base, e4t = quality_scores["base"], quality_scores["e4t-5"]
    assert abs(base.margin) < 1e-9 and base.swap == 0.5, base  # the base model ignores the reference
    # each reference's own attributes come back more often than other identities' (margin above 0)...
    assert e4t.margin > STANDARD_ERRORS * e4t.margin_stderr, e4t
    # ...B's images match B better than A in most ordered pairs, and most identities gain
    assert e4t.swap > 0.5, e4t
    improved = sum(e > b for b, e in zip(base.per_identity_margin, e4t.per_identity_margin))
    assert improved > len(e4t.per_identity_margin) / 2, (base.per_identity_margin, e4t.per_identity_margin)


@pytest.mark.slow
def test_e4t_keeps_prompt_fidelity(quality_scores):
    """Personalizing loses no more of the prompted scene than chance explains: the drop from the base
    model's fidelity stays within the standard errors of a share of this many images, plus one image."""
    base, e4t = quality_scores["base"], quality_scores["e4t-5"]
    images = quality_scores["images"]
    assert base.fidelity > 0.5, base  # the base model draws the prompted background in most images
    spread = (e4t.fidelity * (1 - e4t.fidelity) / images) ** 0.5
    assert base.fidelity - e4t.fidelity <= STANDARD_ERRORS * spread + 1 / images, (base, e4t)


def test_the_benchmarks_default_tuning_is_what_e4t_tune_uses(tmp_path, monkeypatch):
    """``evaluate.default_tuning`` (the settings the meta-training and preconditioner benchmarks simulate) is
    what ``e4t tune`` resolves for a minifaces portrait when no option is given."""
    from e4t_minifaces.evaluate import default_tuning

    import e4tcli.training.tune as tuning
    from e4tcli import api

    class Captured(Exception):
        pass

    def capture(model, image, features, templates, settings, *args, **kwargs):
        raise Captured(settings)

    monkeypatch.setattr(tuning, "tune_concept", capture)
    options = api.TuneOptions(image=str(EXAMPLES / "mira.png"), out=str(tmp_path / "mira.safetensors"))
    with pytest.raises(Captured) as captured:
        api.tune(options, minifaces_domain())
    assert captured.value.args[0] == default_tuning(seed=0)
    assert not (tmp_path / "mira.safetensors").exists()
