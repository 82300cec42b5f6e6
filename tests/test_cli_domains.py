import json

from typer.testing import CliRunner

from e4tcli import __version__
from e4tcli.cli import app
from tests.fake_plugins import install_distribution, plugin_source

runner = CliRunner()


def test_domains_lists_builtins_with_distributions_plainly():
    result = runner.invoke(app, ["domains"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"art", "cats", "faces", "minifaces"}
    assert "e4t-cats 0.1.0" in rows["cats"] and " cat " in rows["cats"]
    assert "e4t-faces" in rows["faces"] and "face" in rows["faces"]
    assert "painting" in rows["art"]
    assert "\x1b[" not in result.stdout and "━" not in result.stdout and "│" not in result.stdout


def test_domains_json_is_one_object():
    result = runner.invoke(app, ["domains", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    by_name = {d["name"]: d for d in data["domains"]}
    assert by_name["cats"]["distribution"] == "e4t-cats"
    assert by_name["faces"]["class_word"] == "face"
    assert by_name["art"]["lambda_emb_tune"] == 0.1


def test_domains_show_prints_every_default():
    result = runner.invoke(app, ["domains", "show", "cats", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    defaults = data["defaults"]
    assert defaults["class_word"] == "cat"
    assert defaults["tune"]["steps"] == 5 and defaults["pretrain"]["batch_size"] == 16
    assert defaults["backbone"] == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert all("S*" in t for t in defaults["prompt_templates"])

    plain = runner.invoke(app, ["domains", "show", "faces"])
    assert plain.exit_code == 0
    assert "tune.steps" in plain.stdout and "lambda_weights" in plain.stdout and "e4t-faces" in plain.stdout


def test_unknown_domain_exits_2_listing_installed():
    result = runner.invoke(app, ["domains", "show", "dogs"])
    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "unknown domain 'dogs'" in line and "art, cats, faces" in line and "pip install" in line


def test_version_lists_core_and_plugins():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == f"e4t {__version__}"
    assert "e4t-cats 0.1.0" in result.stdout and "e4t-art" in result.stdout


def test_no_arguments_shows_help_and_usage_error_is_2():
    assert "domains" in runner.invoke(app, []).output
    assert runner.invoke(app, ["no-such-command"]).exit_code == 2


def test_broken_third_party_plugin_warns_once_and_cli_works(tmp_path, monkeypatch):
    site = tmp_path / "site"
    install_distribution(site, "e4t-broken", "e4t_broken_plugin", "raise ImportError('needs libfoo')\n", "broken")
    bad_word = """
    @hookimpl
    def register_domains(register):
        register(make("horses", class_word="golden retriever"))
    """
    install_distribution(site, "e4t-horses", "e4t_horses_plugin", plugin_source(bad_word), "horses", version="0.3")
    monkeypatch.syspath_prepend(str(site))
    result = runner.invoke(app, ["domains", "--json"])
    assert result.exit_code == 0
    assert {d["name"] for d in json.loads(result.stdout)["domains"]} == {"art", "cats", "faces", "minifaces"}
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 2
    broken = next(w for w in warnings if "broken" in w)
    assert "plugin 'broken' (distribution e4t-broken 1.2.3)" in broken and "needs libfoo" in broken
    horses = next(w for w in warnings if "horses" in w)
    assert "e4t-horses 0.3" in horses and "not a single CLIP token" in horses
    assert "Traceback" not in result.stderr


def test_debug_shows_plugin_traceback(tmp_path, monkeypatch):
    site = tmp_path / "site"
    install_distribution(site, "e4t-broken2", "e4t_broken2_plugin", "raise ImportError('needs libbar')\n", "broken2")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("E4T_DEBUG", "1")
    result = runner.invoke(app, ["domains"])
    assert result.exit_code == 0
    assert "Traceback" in result.stderr and "needs libbar" in result.stderr


def test_distribution_version_is_the_package_version():
    """pyproject.toml reads its version from ``e4tcli.__version__``: the installed metadata agrees."""
    from importlib.metadata import version

    assert version("e4t") == __version__


def test_domains_all_shows_broken_plugins_and_why(tmp_path, monkeypatch):
    site = tmp_path / "site"
    misspelled = """
    @hookimpl
    def register_domain(register):
        register(make("ponies"))
    """
    install_distribution(site, "e4t-ponies", "e4t_ponies_plugin", plugin_source(misspelled), "ponies")
    monkeypatch.syspath_prepend(str(site))
    listed = runner.invoke(app, ["domains", "--all", "--json"])
    assert listed.exit_code == 0
    report = json.loads(listed.stdout)
    assert [(p["plugin"], p["distribution"]) for p in report["problems"]] == [("ponies", "e4t-ponies")]
    assert "did you mean 'register_domains'?" in report["problems"][0]["problem"]
    assert "E4T_BLOCK_PLUGINS=ponies" in listed.stderr
    table = runner.invoke(app, ["domains", "--all"])
    assert "ponies" in table.stdout and "implements unknown hook" in table.stdout
    assert "problems" not in json.loads(runner.invoke(app, ["domains", "--json"]).stdout)
