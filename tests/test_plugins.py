import subprocess
import sys
import types
from importlib.metadata import EntryPoint

import pytest

from e4tcli.domain import Domain, PhaseDefaults
from e4tcli.plugins import load_registry
from e4tcli.vocab import is_single_clip_token
from tests.fake_plugins import install_distribution, plugin_source


def module_from(name: str, body: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(plugin_source(body), module.__dict__)
    return module


GOOD = """
@hookimpl
def register_domains(register):
    register(make("dogs"))
"""


def test_good_plugin_registers_its_domain():
    registry = load_registry([("good", module_from("good", GOOD))], use_entry_points=False)
    assert registry.names() == ["dogs"]
    assert registry.domains["dogs"].plugin.name == "good"
    assert registry.domains["dogs"].domain.class_word == "dog"
    assert registry.problems == []


def test_plugin_that_fails_to_import_is_one_problem_and_others_survive():
    broken = EntryPoint(name="broken", value="e4t_module_that_does_not_exist", group="e4t")
    registry = load_registry([("broken", broken), ("good", module_from("good", GOOD))], use_entry_points=False)
    assert registry.names() == ["dogs"]
    assert len(registry.problems) == 1
    assert "plugin 'broken'" in registry.problems[0]
    assert "ModuleNotFoundError" in registry.problems[0]


def test_duplicate_name_names_both_plugins():
    first = module_from("first", GOOD)
    second = module_from("second", GOOD)
    registry = load_registry([("first", first), ("second", second)], use_entry_points=False)
    assert registry.names() == ["dogs"]
    assert registry.domains["dogs"].plugin.name == "first"
    (problem,) = registry.problems
    assert "plugin 'second'" in problem and "already registered by plugin 'first'" in problem


def test_missing_field_is_reported_with_the_plugin_name():
    no_class_word = """
    @hookimpl
    def register_domains(register):
        register(Domain(name="x", description="d", prompt_templates=("S*",), base_model="b", backbone="c",
                        pretrain=None, tune=None, lambda_weights=0.0, dataset=image_folder))
    """
    empty_backbone = """
    @hookimpl
    def register_domains(register):
        register(make("y", backbone=""))
    """
    registry = load_registry(
        [("nofield", module_from("nofield", no_class_word)), ("empty", module_from("empty", empty_backbone))],
        use_entry_points=False,
    )
    assert registry.names() == []
    problems = sorted(registry.problems)
    assert "plugin 'empty'" in problems[0] and "missing field 'backbone'" in problems[0]
    assert "plugin 'nofield'" in problems[1] and "class_word" in problems[1]


@pytest.mark.parametrize("word", ["golden retriever", "xyzzyq", "cat-dog"])
def test_class_word_of_several_tokens_is_rejected(word):
    body = f"""
    @hookimpl
    def register_domains(register):
        register(make("multi", class_word={word!r}))
        register(make("fine", class_word="cat"))
    """
    registry = load_registry([("multi", module_from("multi", body))], use_entry_points=False)
    assert registry.names() == ["fine"]
    (problem,) = registry.problems
    assert f"class word '{word}' is not a single CLIP token" in problem and "plugin 'multi'" in problem


def test_template_without_placeholder_is_rejected():
    body = """
    @hookimpl
    def register_domains(register):
        register(make("bad", prompt_templates=("a photo of a dog",)))
    """
    registry = load_registry([("bad", module_from("bad", body))], use_entry_points=False)
    assert registry.names() == [] and "does not contain 'S*'" in registry.problems[0]


def test_pretrain_templates_are_checked_like_prompt_templates():
    body = """
    @hookimpl
    def register_domains(register):
        register(make("fine", pretrain_templates=("S* on a {background} background",)))
        register(make("noplaceholder", pretrain_templates=("a dog on a {background} background",)))
        register(make("onestring", pretrain_templates="S* on a {background} background"))
        register(make("none", pretrain_templates=None))
    """
    registry = load_registry([("pt", module_from("pt", body))], use_entry_points=False)
    assert registry.names() == ["fine"]
    problems = sorted(registry.problems)
    assert len(problems) == 3
    assert "plugin 'pt'" in problems[0]
    assert sum("does not contain 'S*'" in p for p in problems) == 1
    assert sum("'pretrain_templates' must be a tuple" in p for p in problems) == 2


def test_hook_that_raises_costs_only_its_plugin():
    raising = """
    @hookimpl
    def register_domains(register):
        raise RuntimeError("boom")
    """
    registry = load_registry(
        [("raising", module_from("raising", raising)), ("good", module_from("good", GOOD))], use_entry_points=False
    )
    assert registry.names() == ["dogs"]
    assert registry.problems == ["plugin 'raising' failed to register its domains: RuntimeError: boom"]


def test_single_token_check_matches_clip_vocabulary():
    assert all(is_single_clip_token(w) for w in ["face", "cat", "painting", "dog", "Cat"])
    assert not any(is_single_clip_token(w) for w in ["golden retriever", "xyzzyq", "", "cat!"])


def test_builtin_domains_come_from_their_own_distributions():
    registry = load_registry()
    for name, dist, word in [
        ("faces", "e4t-faces", "face"),
        ("cats", "e4t-cats", "cat"),
        ("art", "e4t-art", "painting"),
    ]:
        entry = registry.domains[name]
        assert entry.plugin.distribution == dist
        assert entry.domain.class_word == word


def test_entry_point_plugin_env_controls(tmp_path, monkeypatch):
    site = tmp_path / "site"
    install_distribution(
        site, "e4t-wolves", "e4t_wolves_plugin", plugin_source(GOOD.replace("dogs", "wolves")), "wolves"
    )
    monkeypatch.syspath_prepend(str(site))
    registry = load_registry()
    assert registry.domains["wolves"].plugin.distribution == "e4t-wolves"
    assert registry.domains["wolves"].plugin.version == "1.2.3"

    monkeypatch.setenv("E4T_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert load_registry().names() == ["art", "cats", "faces", "minifaces"]
    monkeypatch.setenv("E4T_LOAD_PLUGINS", "e4t-wolves")
    assert "wolves" in load_registry().names()

    monkeypatch.delenv("E4T_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("E4T_BLOCK_PLUGINS", "wolves,e4t-cats")
    assert load_registry().names() == ["art", "faces", "minifaces"]


def test_registering_every_domain_imports_no_torch():
    code = (
        "import sys; from e4tcli.plugins import load_registry; r = load_registry(); "
        "assert set(r.names()) >= {'faces', 'cats', 'art'}; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'PIL') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_domain_defaults_are_plain_data():
    domain = Domain(
        name="d",
        description="x",
        class_word="cat",
        prompt_templates=("S*",),
        base_model="b",
        backbone="c",
        pretrain=PhaseDefaults(1, 1e-4, 1, 64, 0.1),
        tune=PhaseDefaults(1, 1e-4, 1, 64, 0.1),
        lambda_weights=0.5,
        dataset=len,
    )
    defaults = domain.defaults()
    assert defaults["tune"] == {
        "steps": 1,
        "learning_rate": 1e-4,
        "batch_size": 1,
        "resolution": 64,
        "lambda_emb": 0.1,
        "offset_learning_rate": None,
        "bias_learning_rate": None,
        "additive_rank": 0,
        "additive_learning_rate": None,
    }
    assert defaults["prompt_templates"] == ["S*"]
    assert defaults["dataset"] == "builtins.len"
    assert defaults["offsets"] == {"kind": "paper", "rank": 4, "layers": "attention"}


def test_prompt_template_fields():
    from e4tcli.domain import fill_template, plain_templates, template_fields

    assert template_fields("a {style} painting by S*") == {"style"}
    assert template_fields("a photo of S*") == set()
    assert fill_template("a {style} painting by S*", {"style": "Ukiyo_e"}) == "a Ukiyo e painting by S*"
    assert fill_template("a {style} painting by S*", {"artist": "x"}) is None
    assert fill_template("a {style} painting by S*", {"style": ""}) is None
    assert plain_templates(("a {style} S*", "art by S*")) == ("art by S*",)


@pytest.mark.parametrize(
    "templates, problem",
    [
        (("a {style} painting by S*",), "at least one template without {fields}"),
        (("art by S*", "a {0} painting by S*"), "named fields"),
        (("art by S*", "a {style painting by S*"), "malformed"),
    ],
)
def test_bad_template_fields_are_rejected(templates, problem):
    from dataclasses import replace

    from e4tcli.domain import validate_domain

    art = load_registry().get("art").domain
    problems = validate_domain(replace(art, prompt_templates=templates))
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    "offsets, problem",
    [
        (dict(kind="dense"), "offsets.kind must be one of paper, lowrank"),
        (dict(layers="everything"), "offsets.layers must be one of attention, attention+resnets"),
        (dict(kind="lowrank", rank=0), "offsets.rank must be a positive integer"),
    ],
)
def test_bad_offset_defaults_are_rejected(offsets, problem):
    from dataclasses import replace

    from e4tcli import OffsetDefaults
    from e4tcli.domain import validate_domain

    cats = load_registry().get("cats").domain
    assert validate_domain(cats) == []
    problems = validate_domain(replace(cats, offsets=OffsetDefaults(**offsets)))
    assert any(problem in p for p in problems), problems


def test_a_tuning_bias_rate_is_optional_positive_and_overridden_by_the_option():
    from dataclasses import replace

    from e4tcli.api.common import bias_rate
    from e4tcli.domain import validate_domain

    cats = load_registry().get("cats").domain
    assert validate_domain(replace(cats, tune=replace(cats.tune, bias_learning_rate=3e-3))) == []
    problems = validate_domain(replace(cats, tune=replace(cats.tune, bias_learning_rate=-1.0)))
    assert any("tune.bias_learning_rate must be a positive number" in p for p in problems), problems
    assert bias_rate(None, 3e-3) == 3e-3  # the domain's
    assert bias_rate(1e-2, 3e-3) == 1e-2  # --bias-lr wins
    assert bias_rate(0.0, 3e-3) is None  # --bias-lr 0: not tuned
    assert bias_rate(None, None) is None


def test_an_additive_rank_is_a_whole_number_and_for_tuning_only():
    from dataclasses import replace

    from e4tcli.domain import validate_domain

    cats = load_registry().get("cats").domain
    assert validate_domain(replace(cats, tune=replace(cats.tune, additive_rank=16, additive_learning_rate=3e-3))) == []
    for phase, rank, problem in (
        ("tune", -1, "tune.additive_rank must be a whole number"),
        ("tune", 2.5, "tune.additive_rank must be a whole number"),
        ("pretrain", 4, "pretrain.additive_rank must be 0"),
    ):
        problems = validate_domain(replace(cats, **{phase: replace(getattr(cats, phase), additive_rank=rank)}))
        assert any(problem in p for p in problems), problems


def test_template_field_with_a_falsy_value_is_filled():
    from e4tcli.domain import fill_template

    assert fill_template("style {style_id} by S*", {"style_id": 0}) == "style 0 by S*"
    assert fill_template("style {style_id} by S*", {"style_id": None}) is None


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            "@hookimpl\ndef register_domain(register):\n    register(make('dogs'))\n",
            "plugin 'bad' implements unknown hook 'register_domain': did you mean 'register_domains'?",
        ),
        (
            "@hookimpl\ndef register_domains(register, settings):\n    register(make('dogs'))\n",
            "plugin 'bad' implements register_domains with parameters its spec does not have: "
            "use def register_domains(register)",
        ),
        (
            "def register_domains(register):\n    register(make('dogs'))\n",
            "plugin 'bad' implements no e4t hook: mark its register_domains function with @e4tcli.hookimpl",
        ),
    ],
)
def test_a_plugin_whose_hook_cannot_be_called_is_one_line_naming_it_and_the_fix(body, expected):
    registry = load_registry(
        [("bad", module_from("bad", body)), ("good", module_from("good", GOOD))], use_entry_points=False
    )
    assert registry.names() == ["dogs"]
    assert registry.problems == [expected]
    assert [plugin.name for plugin, _ in registry.broken] == ["bad"]
