"""The plugin example of docs/plugins.md, installed as a distribution, shows up in `e4t domains`."""

import json
import os
import re
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

PLUGIN_DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def docs_block(first_line: str) -> str:
    for block in re.findall(r"```\w*\n(.*?)```", PLUGIN_DOCS.read_text(), flags=re.S):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"docs/plugins.md has no code block starting with {first_line!r}")


def test_plugin_example_is_listed(tmp_path):
    pyproject = tomllib.loads(docs_block("# pyproject.toml"))
    module_source = docs_block("# e4t_dogs.py")
    project = pyproject["project"]
    ((entry_name, module),) = project["entry-points"]["e4t"].items()
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{module}.py").write_text(module_source)
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text(f"[e4t]\n{entry_name} = {module}\n")

    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-m", "e4tcli", "domains", "--json"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stderr == ""
    domains = {d["name"]: d for d in json.loads(result.stdout)["domains"]}
    assert domains["dogs"]["distribution"] == "e4t-dogs"
    assert domains["dogs"]["class_word"] == "dog"
    assert {"faces", "cats", "art"} <= set(domains)
