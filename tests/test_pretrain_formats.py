"""`e4t pretrain` on each domain's real dataset format, on the tiny model (the issue's "done when")."""

import json

import pytest
from typer.testing import CliRunner

from e4tcli.cli import app
from tests.test_dataset_formats import lmdb_folder, photos, shard_folder, shard_server, wikiart_root  # noqa: F401 (fixtures)

runner = CliRunner()


@pytest.fixture
def ffhq_folder(tmp_path, photos):  # noqa: F811
    folder = tmp_path / "ffhq" / "00000"
    folder.mkdir(parents=True)
    for i, image in enumerate(photos.values()):
        image.resize((128, 128)).save(folder / f"{i:05d}.png")
    return folder.parent


@pytest.mark.parametrize(
    "domain, data",
    [
        ("cats", "lmdb"),
        ("art", "wikiart"),
        ("faces", "ffhq"),
        ("cats", "shards"),
        ("cats", "remote shards"),
    ],
)
def test_pretrain_runs_on_each_dataset_format(domain, data, request, tiny_sd, tiny_backbone, tmp_path):
    source = {
        "lmdb": lambda: request.getfixturevalue("lmdb_folder")[0],
        "wikiart": lambda: request.getfixturevalue("wikiart_root"),
        "ffhq": lambda: request.getfixturevalue("ffhq_folder"),
        "shards": lambda: request.getfixturevalue("shard_folder"),
        "remote shards": lambda: request.getfixturevalue("shard_server").url + "/shards-{000..002}.tar",
    }[data]()
    result = runner.invoke(
        app,
        [
            "pretrain",
            "--domain",
            domain,
            "--data",
            str(source),
            "--out",
            str(tmp_path / "run"),
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
            "32",
            "--workers",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 2 and report["domain"] == domain
    config = json.loads((tmp_path / "run" / "checkpoint-0000002" / "config.json").read_text())
    assert config["domain"] == domain and config["recipe"]["data"] == str(source)
