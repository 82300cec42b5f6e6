"""The miniature world: the generator, the shipped models, the main job offline, and
the reduced quality check (E4T-5 must beat no personalization on identity)."""

import json
import random
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from e4t_minifaces import EXAMPLES, WEIGHTS, minifaces_domain, world

runner = CliRunner()

IDENTITY_GAIN_MIN = 0.05
"""E4T-5's identity score must exceed the base model's (class word only) by at least this much
(measured on these 3 identities: 0.466 against 0.385, each identity better; a random face
scores about 0.29)."""
FIDELITY_LOSS_MAX = 0.25
"""...while losing at most this much prompt fidelity (share of images with the prompted background)."""


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


def test_described_captions_name_a_few_true_attributes_never_a_whole_identity():
    """The experiment's captions use appearance words for at most three attributes, each one the face's own."""
    phrases = {
        name: {world.ATTRIBUTE_PHRASES[name](value) for value in choices}
        for name, choices in world.IDENTITY_CHOICES.items()
    }
    stream = world.samples(seed=4, describe_attributes=True)
    described_counts = []
    for _ in range(1000):
        sample = next(stream)
        words = set(sample.caption.replace(",", " ").split())
        assert world.CLASS_WORD in words
        assert set(re.findall(r"(\w+) background", sample.caption)) <= {sample.scene.background}
        described = {name for name, options in phrases.items() if any(p in sample.caption for p in options)}
        for name in described:  # every attribute it names is the face's own
            assert world.ATTRIBUTE_PHRASES[name](getattr(sample.identity, name)) in sample.caption, sample.caption
        assert len(described) <= world.MAX_DESCRIBED, sample.caption
        described_counts.append(len(described))
    for count, weight in enumerate(world.DESCRIBED_COUNT_WEIGHTS):
        share = weight / sum(world.DESCRIBED_COUNT_WEIGHTS)
        assert abs(described_counts.count(count) / len(described_counts) - share) < 0.05, count
    assert max(described_counts) == world.MAX_DESCRIBED
    plain, described = world.samples(seed=4), world.samples(seed=4, describe_attributes=True)
    for _ in range(50):  # the same images and scenes either way: only the words differ
        a, b = next(plain), next(described)
        assert (a.identity, a.scene) == (b.identity, b.scene)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


# --------------------------------------------------------------------------- the shipped models
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


# --------------------------------------------------------------------------- the main job, offline
def test_main_job_tunes_an_example_and_generates_it(tmp_path):
    from e4tcli.cli import app

    example = EXAMPLES / "mira.png"
    concept = tmp_path / "mira.safetensors"
    result = runner.invoke(app, ["tune", str(example), "--domain", "minifaces", "--out", str(concept), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 5
    result = runner.invoke(app, [
        "generate", str(concept), "a S* on a red background", "--num-images", "2", "--steps", "10",
        "--out", str(tmp_path / "out"), "--json",
    ])
    assert result.exit_code == 0, result.output
    images = [Image.open(p) for p in json.loads(result.stdout)["images"]]
    assert [i.size for i in images] == [(world.RESOLUTION, world.RESOLUTION)] * 2


def test_checkpoint_whose_recorded_model_folder_moved_falls_back_to_the_domains(tmp_path):
    """The shipped checkpoint records the build machine's folders; the installed package's are used instead."""
    from e4tcli import api

    moved = tmp_path / "checkpoint"
    shutil.copytree(WEIGHTS / "checkpoint", moved)
    config = json.loads((moved / "config.json").read_text())
    config["base_model"]["source"] = str(tmp_path / "gone" / "base")
    config["backbone"]["source"] = str(tmp_path / "gone" / "backbone")
    (moved / "config.json").write_text(json.dumps(config))
    options = api.TuneOptions(image=str(EXAMPLES / "otto.png"), checkpoint=str(moved), out=str(tmp_path / "o.safetensors"), steps=1)
    result = api.tune(options, minifaces_domain())
    assert result.concept.is_file()
    assert api.recorded_source("relative/hub-id", "fallback") == "relative/hub-id"


# --------------------------------------------------------------------------- the reduced quality check
@pytest.fixture(scope="module")
def quality_scores():
    from e4t_minifaces.evaluate import EvalSettings, World, evaluate

    settings = EvalSettings(identities=3, seeds_per_prompt=2, backgrounds=("red", "blue"), sampling_steps=20)
    return {s.method: s for s in evaluate(World(WEIGHTS), ["base", "e4t-5"], settings)}


def test_e4t_five_steps_keeps_identity_better_than_no_personalization(quality_scores):
    base, e4t = quality_scores["base"], quality_scores["e4t-5"]
    assert e4t.identity - base.identity >= IDENTITY_GAIN_MIN, (base, e4t)
    assert all(e >= b for b, e in zip(base.per_identity, e4t.per_identity)), "no identity may get worse"


def test_e4t_keeps_prompt_fidelity(quality_scores):
    base, e4t = quality_scores["base"], quality_scores["e4t-5"]
    assert base.fidelity >= 0.75, base
    assert base.fidelity - e4t.fidelity <= FIDELITY_LOSS_MAX, (base, e4t)
