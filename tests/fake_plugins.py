"""Build fake plugin distributions on disk, found through the real entry-point machinery."""

import textwrap
from pathlib import Path

GOOD_DOMAIN = """
from e4tcli import Domain, PhaseDefaults, hookimpl
from e4tcli.datasets import image_folder


def make(name, class_word="dog", **overrides):
    fields = dict(
        name=name,
        description="A test domain.",
        class_word=class_word,
        prompt_templates=("a photo of S*",),
        base_model="some/base-model",
        backbone="some/backbone",
        pretrain=PhaseDefaults(steps=10, learning_rate=1e-4, batch_size=2, resolution=64, lambda_emb=0.01),
        tune=PhaseDefaults(steps=5, learning_rate=1e-4, batch_size=2, resolution=64, lambda_emb=0.1),
        lambda_weights=1e-4,
        dataset=image_folder,
    )
    fields.update(overrides)
    return Domain(**fields)
"""


def plugin_source(body: str) -> str:
    """A plugin module: the helper ``make`` above plus ``body`` (dedented)."""
    return GOOD_DOMAIN + "\n" + textwrap.dedent(body)


def install_distribution(site: Path, distribution: str, module: str, source: str, entry_name: str, version="1.2.3"):
    """Write ``module.py`` and a dist-info declaring it under the ``e4t`` entry-point group."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[e4t]\n{entry_name} = {module}\n")
