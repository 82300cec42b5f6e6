"""A fresh install prints only e4t's lines, installs without deprecation warnings, and nothing
shipped or written names a folder of the machine that made it."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e4t_minifaces import EXAMPLES
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
E4T = [sys.executable, "-m", "e4tcli"]


def run_e4t(*args, **kwargs):
    return subprocess.run([*E4T, *args], capture_output=True, text=True, timeout=300, **kwargs)


def foreign_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("e4t: ")]


@pytest.fixture(scope="module")
def mira(tmp_path_factory):
    """`e4t tune` on the shipped miniature world, in a process of its own, as a user runs it."""
    concept = tmp_path_factory.mktemp("quiet") / "mira.safetensors"
    result = run_e4t("tune", str(EXAMPLES / "mira.png"), "--domain", "minifaces", "--out", str(concept))
    assert result.returncode == 0, result.stderr
    return concept, result


@pytest.mark.slow
def test_tune_and_generate_print_only_their_own_lines_and_images_name_no_folder_of_the_machine(mira, tmp_path):
    import importlib.util

    installed = {name: importlib.util.find_spec(name) is not None for name in ("bitsandbytes", "lmdb", "tensorboard")}
    concept, tuned = mira
    generated = run_e4t("generate", str(concept), "a S* on a red background", "-n", "2", "--out", str(tmp_path))
    assert generated.returncode == 0, generated.stderr
    assert foreign_lines(tuned.stderr) == [], (installed, tuned.stderr)
    assert foreign_lines(generated.stderr) == [], (installed, generated.stderr)
    for image in ("mira-0.png", "mira-1.png"):  # nor does what it writes name a folder of this machine
        assert absolute_paths(dict(Image.open(tmp_path / image).text)) == [], image
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from e4tcli.cli.quiet import quiet_heavy_imports; quiet_heavy_imports();"
            "from diffusers import StableDiffusionPipeline, UNet2DConditionModel; import diffusers.loaders.peft;"
            "print(any(m is not None for n, m in sys.modules.items() if n.split('.')[0] == 'bitsandbytes'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.strip() == "False"  # and its import's seconds are not spent


@pytest.mark.parametrize("project", ["", "domains/minifaces", "domains/faces", "domains/cats", "domains/art"])
def test_package_metadata_builds_without_deprecation_warnings(project, tmp_path):
    """What pip runs on install: setuptools' metadata hook, with every warning recorded."""
    script = (
        "import sys, warnings\n"
        "from setuptools import build_meta\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    build_meta.prepare_metadata_for_build_wheel(sys.argv[1])\n"
        "print('WARNINGS', [f'{w.category.__name__}: {str(w.message).strip().splitlines()[0]}' for w in caught])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT / project, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "WARNINGS []", result.stdout
    metadata = next(tmp_path.glob("*.dist-info")) / "METADATA"
    if not project:
        assert "License-Expression: Apache-2.0" in metadata.read_text()


def absolute_paths(value, where=""):
    """Every string inside ``value`` (nested dicts and lists) that is an absolute path of some machine."""
    if isinstance(value, dict):
        return [hit for key, item in value.items() for hit in absolute_paths(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [hit for i, item in enumerate(value) for hit in absolute_paths(item, f"{where}[{i}]")]
    if isinstance(value, str) and (value.startswith(("/", "~")) or value[1:3] in (":\\", ":/")):
        return [f"{where} = {value}"]
    return []


@pytest.mark.slow
def test_shipped_configs_and_a_fresh_concept_name_no_folder_of_a_machine(mira):
    from e4tcli.io.concept import read_concept_info

    shipped = [path for domain in (ROOT / "domains").iterdir() for path in domain.rglob("weights/**/*.json")]
    assert any(path.name == "config.json" and path.parent.name == "checkpoint" for path in shipped)
    for path in shipped:
        if path.name != "vocab.json":
            assert absolute_paths(json.loads(path.read_text())) == [], path
    info = read_concept_info(mira[0])
    assert info["base_model"]["source"] == info["checkpoint"]["source"] == "domain:minifaces"
    assert absolute_paths(info) == []  # its images: in the first test


def test_a_concept_of_a_domain_that_is_not_installed_says_so(mira, tmp_path, monkeypatch):
    from e4tcli import api
    from e4tcli.errors import UsageError

    monkeypatch.setattr("e4tcli.api.generation.installed_base_model", lambda name: None)
    with pytest.raises(UsageError, match="domain 'minifaces', which is not installed"):
        api.generate(api.GenerateOptions(concept=str(mira[0]), prompt="a S*", steps=1, out=str(tmp_path)))


@pytest.mark.slow
def test_an_interrupted_generation_keeps_the_images_it_wrote(mira, tmp_path):
    """Ctrl-C; SIGTERM takes the same handler (`e4tcli.stopping`), tested through pretrain."""
    stop = signal.SIGINT
    out = tmp_path / "images"
    process = subprocess.Popen(
        [
            *E4T,
            "generate",
            str(mira[0]),
            "a S* on a red background",
            "-n",
            "400",
            "--batch-size",
            "2",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out.is_dir() and len(list(out.glob("mira-*.png"))) >= 2):
        time.sleep(0.1)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + stop, stderr
    written = sorted(out.glob("mira-*.png"))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"e4t: error: stopped by {stop.name}: {len(written)} of 400 images"
    ), stderr
    assert 2 <= len(written) < 400 and [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    for path in written:
        Image.open(path).load()  # every file that is there is whole
    assert "-n" in lines[0] and f"--seed {len(written)}" in lines[0]


def test_peak_memory_is_reported_in_megabytes():
    """Touching 200 MB more in a fresh process raises its reported peak by about that much."""
    script = (
        "from e4tcli.memory import peak_rss_mb\n"
        "before = peak_rss_mb()\n"
        "block = bytearray(200 * 1000 * 1000)\n"
        "block[::4096] = b'x' * len(block[::4096])\n"
        "print(before, peak_rss_mb())\n"
    )
    before, after = map(
        float, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    )
    assert 5 < before < 200 and 180 < after - before < 230, (before, after)
