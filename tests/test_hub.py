"""Published domain checkpoints (push, pull, verify) and tuning without one, offline.

The Hub is never contacted: ``FakeHub`` stands in for ``HfApi`` and writes what
it is given into a temporary Hugging Face cache, exactly where a download
would put it; the endpoint points at a closed local port.
"""

import hashlib
import itertools
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from e4tcli.cli import app
from tests.fake_plugins import install_distribution, plugin_source

runner = CliRunner()
REPO = "someone/e4t-cats"
PLUGIN_NUMBERS = itertools.count()


class FakeHub:
    """``HfApi``'s create_repo and upload_folder, committing into the local Hugging Face cache."""

    uploads: list = []

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        assert exist_ok and repo_type == "model"

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None):
        import huggingface_hub.constants as constants

        digest = hashlib.sha1()
        for path in sorted(Path(folder_path).iterdir()):
            digest.update(path.name.encode() + path.read_bytes())
        oid = digest.hexdigest()
        snapshot = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / oid
        shutil.copytree(folder_path, snapshot, dirs_exist_ok=True)
        FakeHub.uploads.append({"repo_id": repo_id, "files": sorted(p.name for p in snapshot.iterdir())})
        return SimpleNamespace(oid=oid, commit_url=f"https://hub.invalid/{repo_id}/commit/{oid}")


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest's guard; the closed port is safe
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.uploads = []
    return cache


def install_cats(tmp_path, monkeypatch, tiny_sd, tiny_backbone, **fields) -> None:
    """A plugin registering 'cats' on the tiny models with ``fields`` (the real cats plugin is blocked)."""
    arguments = "".join(f", {name}={value!r}" for name, value in fields.items())
    body = f"""
    @hookimpl
    def register_domains(register):
        register(make("cats", class_word="cat", base_model={str(tiny_sd)!r}, backbone={str(tiny_backbone)!r}{arguments}))
    """
    site = tmp_path / "site"
    module = f"e4t_test_cats_{next(PLUGIN_NUMBERS)}"  # a new module: Python keeps the ones it imported
    install_distribution(site, "e4t-test-cats", module, plugin_source(body), "testcats")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("E4T_BLOCK_PLUGINS", "cats")


def install_published(tmp_path, monkeypatch, tiny_sd, tiny_backbone, revision: str, fingerprint: str) -> None:
    """'cats' naming REPO at ``revision`` with ``fingerprint``."""
    pins = {"checkpoint": REPO, "checkpoint_revision": revision, "checkpoint_fingerprint": fingerprint}
    install_cats(tmp_path, monkeypatch, tiny_sd, tiny_backbone, **pins)


def cats_status() -> str:
    listed = json.loads(runner.invoke(app, ["domains", "--json"]).stdout)
    return next(d for d in listed["domains"] if d["name"] == "cats")["checkpoint_status"]


def pushed(tiny_checkpoint) -> dict:
    result = runner.invoke(app, ["domains", "push", str(tiny_checkpoint), REPO, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_push_publishes_weights_config_and_model_card(local_hub, tiny_checkpoint):
    published = pushed(tiny_checkpoint)
    assert FakeHub.uploads == [{"repo_id": REPO, "files": ["README.md", "config.json", "model.safetensors"]}]
    snapshot = local_hub / "models--someone--e4t-cats" / "snapshots" / published["revision"]
    config = json.loads((snapshot / "config.json").read_text())
    assert config["fingerprint"] == published["fingerprint"]
    card = (snapshot / "README.md").read_text()
    assert "library_name: e4t" in card and "| domain | cats |" in card
    assert config["base_model"]["fingerprint"] in card and "| steps | 2 |" in card
    assert f'checkpoint_fingerprint="{published["fingerprint"]}"' in card
    losses = [line for line in card.splitlines() if "(mean of the last 100 logged steps)" in line]
    assert [line.split(" (")[0] for line in losses] == ["| loss", "| denoising", "| embedding", "| weights"]
    # a checkpoint folder of the run publishes the same files: the card still finds the run's log
    assert pushed(tiny_checkpoint / "checkpoint-0000002")["revision"] == published["revision"]
    text = runner.invoke(app, ["domains", "push", str(tiny_checkpoint), "not a repo id"])
    assert text.exit_code == 2 and "not a hub id" in text.stderr


def test_pull_verifies_then_tune_uses_the_published_domain(
    local_hub, tiny_checkpoint, tiny_sd, tiny_backbone, photo_folder, tmp_path, monkeypatch
):
    published = pushed(tiny_checkpoint)
    install_published(tmp_path, monkeypatch, tiny_sd, tiny_backbone, published["revision"], published["fingerprint"])
    listed = json.loads(runner.invoke(app, ["domains", "--json"]).stdout)
    assert next(d for d in listed["domains"] if d["name"] == "cats")["checkpoint"] == REPO
    assert cats_status() == f"{REPO}@{published['revision'][:12]} (pulled)"
    pull = runner.invoke(app, ["domains", "pull", "cats", "--json"])
    assert pull.exit_code == 0, pull.output
    assert json.loads(pull.stdout)["fingerprint"] == published["fingerprint"]

    concept = tmp_path / "chelsea.safetensors"
    image = str(photo_folder / "chelsea.png")
    tuned = runner.invoke(app, ["tune", image, "--domain", "cats", "--steps", "1", "--out", str(concept), "--json"])
    assert tuned.exit_code == 0, tuned.output
    assert json.loads(tuned.stdout)["checkpoint"] == REPO
    assert tuned.stderr == ""  # cached: no "pulling" line
    info = json.loads(runner.invoke(app, ["concept", "info", str(concept), "--json"]).stdout)
    assert info["checkpoint"] == {"source": REPO, "fingerprint": published["fingerprint"]}


def test_a_checkpoint_whose_fingerprint_differs_is_refused(
    local_hub, tiny_checkpoint, tiny_sd, tiny_backbone, photo_folder, tmp_path, monkeypatch
):
    published = pushed(tiny_checkpoint)
    install_published(tmp_path, monkeypatch, tiny_sd, tiny_backbone, published["revision"], "0123456789abcdef")
    for command in (["domains", "pull", "cats"], ["tune", str(photo_folder / "chelsea.png"), "--domain", "cats"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith("e4t: error: domain checkpoint someone/e4t-cats@")
        assert f"has fingerprint {published['fingerprint']}, but the domain plugin declares 0123456789abcdef" in error
    assert not (photo_folder / "chelsea.e4t.safetensors").exists()


def test_an_unreachable_checkpoint_is_one_line_after_the_pulling_notice(
    local_hub, tiny_sd, tiny_backbone, photo_folder, tmp_path, monkeypatch
):
    import time

    from huggingface_hub.utils import _http

    no_waits = SimpleNamespace(**(vars(time) | {"sleep": lambda seconds: None}))
    monkeypatch.setattr(_http, "time", no_waits)  # huggingface_hub still retries, without its waits (23 s)
    install_published(tmp_path, monkeypatch, tiny_sd, tiny_backbone, "ab" * 20, "0123456789abcdef")
    assert cats_status().endswith("(not pulled yet)")
    partial = local_hub / "models--someone--e4t-cats" / "snapshots" / ("ab" * 20)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # an interrupted download: the weights never came
    assert cats_status().endswith("(not pulled yet)")
    out = tmp_path / "c.safetensors"
    result = runner.invoke(app, ["tune", str(photo_folder / "chelsea.png"), "--domain", "cats", "--out", str(out)])
    assert result.exit_code == 1
    notice, error = result.stderr.strip().splitlines()
    assert notice == f"e4t: pulling domain 'cats' checkpoint {REPO}@abababababab (first use; cached afterwards)"
    assert error.startswith(f"e4t: error: could not download domain checkpoint {REPO}@abababababab")
    assert "the download resumes" in error and not out.exists()


def test_a_hub_checkpoint_must_be_pinned():
    from e4tcli.domain import validate_domain
    from e4tcli.plugins import load_registry

    cats = load_registry().get("cats").domain
    problems = validate_domain(replace(cats, checkpoint=REPO, checkpoint_revision="main"))
    assert any("checkpoint_revision, a commit of 40 hex digits" in p for p in problems)
    assert any("needs checkpoint_fingerprint" in p for p in problems)
    pinned = replace(cats, checkpoint=REPO, checkpoint_revision="ab" * 20, checkpoint_fingerprint="0123456789abcdef")
    assert validate_domain(pinned) == []


def test_without_a_checkpoint_tune_starts_from_the_base_model(
    local_hub, tiny_sd, tiny_backbone, photo_folder, tmp_path, monkeypatch
):
    from e4tcli.domain import FALLBACK_STEPS, PhaseDefaults
    from e4tcli.plugins import load_registry

    install_cats(
        tmp_path,
        monkeypatch,
        tiny_sd,
        tiny_backbone,
        fallback=PhaseDefaults(steps=3, learning_rate=1e-3, batch_size=2, resolution=64, lambda_emb=0.1),
    )
    cats = load_registry().get("cats").domain
    assert cats.checkpoint is None and cats.fallback_defaults().steps == 3
    concept = tmp_path / "chelsea.safetensors"
    image = str(photo_folder / "chelsea.png")
    tuned = runner.invoke(
        app, ["tune", image, "--domain", "cats", "--base-model", str(tiny_sd), "--out", str(concept), "--json"]
    )
    assert tuned.exit_code == 0, tuned.output
    assert json.loads(tuned.stdout)["steps"] == 3 and json.loads(tuned.stdout)["checkpoint"] == "none"
    (notice,) = tuned.stderr.strip().splitlines()
    assert notice.startswith("e4t: domain 'cats' has no checkpoint: tuning from the base model, 3 steps")
    assert "'e4t domains'" in notice and "docs/pretraining.md" in notice
    info = runner.invoke(app, ["concept", "info", str(concept)])
    assert "checkpoint: none (tuned from the base model)" in info.stdout
    assert json.loads(runner.invoke(app, ["concept", "info", str(concept), "--json"]).stdout)["checkpoint"] is None

    images = tmp_path / "images"
    drawn = runner.invoke(app, ["generate", str(concept), "S* on a sofa", "--steps", "2", "--out", str(images)])
    assert drawn.exit_code == 0, drawn.output
    assert len(list(images.glob("*.png"))) == 1
    exported = runner.invoke(app, ["export", str(concept), "--format", "diffusers", "--out", str(tmp_path / "x")])
    assert exported.exit_code == 0, exported.output

    no_fallback = PhaseDefaults(**{**vars(cats.tune), "steps": FALLBACK_STEPS})
    assert replace(cats, fallback=None).fallback_defaults() == no_fallback


def test_the_headline_command_needs_no_pretraining(tiny_sd, tiny_backbone, photo_folder, tmp_path):
    """``e4t tune cat.jpg --domain cats --base-model DIR`` on the built-in cats domain, which has no checkpoint."""
    concept = tmp_path / "chelsea.safetensors"
    command = ["tune", str(photo_folder / "chelsea.png"), "--domain", "cats", "--base-model", str(tiny_sd)]
    command += ["--backbone", str(tiny_backbone), "--out", str(concept)]
    result = runner.invoke(app, [*command, "--steps", "2", "--batch-size", "1", "--resolution", "64"])
    assert result.exit_code == 0, result.output
    (notice,) = result.stderr.strip().splitlines()
    assert notice.startswith("e4t: domain 'cats' has no checkpoint: tuning from the base model, 2 steps")
    assert result.stdout.startswith(f"Wrote {concept} (") and "after 2 steps" in result.stdout


def test_checkpoint_none_skips_the_domain_checkpoint(tiny_checkpoint, tiny_sd, tiny_backbone, photo_folder, tmp_path):
    from e4tcli import api
    from e4tcli.io.concept import load_concept
    from e4tcli.plugins import load_registry

    cats = load_registry().get("cats").domain
    domain = replace(cats, checkpoint=str(tiny_checkpoint), backbone=str(tiny_backbone), base_model=str(tiny_sd))
    assert not api.tunes_from_base(domain, None) and api.tunes_from_base(domain, "none")
    options = api.TuneOptions(
        image=str(photo_folder / "chelsea.png"), out=str(tmp_path / "a.safetensors"), steps=0, save_precision="fp32"
    )
    from_checkpoint = load_concept(api.tune(options, domain).concept)
    options = replace(options, checkpoint="none", out=str(tmp_path / "b.safetensors"))
    from_base = load_concept(api.tune(options, domain).concept)
    assert from_base.info["checkpoint"] is None
    assert from_checkpoint.info["checkpoint"]["fingerprint"]

    # zero steps from the base model: the encoder's last layer and every offset are zero (S* = the class word)
    def largest(concept, prefix):
        values = [float(t.abs().max()) for name, t in concept.tensors.items() if name.startswith(prefix)]
        assert values, prefix
        return max(values)

    assert largest(from_base, "encoder.out.") == 0 and largest(from_checkpoint, "encoder.out.") > 0
    offsets = {name.rsplit(".", 1)[0] for name in from_base.tensors if name.startswith("offsets.")}
    for layer in offsets:
        column, row = from_base.tensors[f"{layer}.column"], from_base.tensors[f"{layer}.row"]
        assert float(column.abs().max()) * float(row.abs().max()) == 0, layer
