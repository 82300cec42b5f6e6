"""Each built-in domain ships a paper-scale recipe that loads and agrees with the domain's defaults."""

from pathlib import Path

import pytest

from e4tcli.plugins import load_registry
from e4tcli.recipe import load_recipe, merge_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["faces", "cats", "art"])
def test_shipped_recipe_matches_domain(name):
    recipe = load_recipe(ROOT / "domains" / name / "recipe.yaml")
    domain = load_registry().get(name).domain
    assert recipe["domain"] == name
    assert recipe["steps"] == domain.pretrain.steps
    assert recipe["batch_size"] == domain.pretrain.batch_size == 16
    assert recipe["learning_rate"] == domain.pretrain.learning_rate
    assert recipe["base_model"] == domain.base_model and recipe["backbone"] == domain.backbone


def test_flags_override_only_when_given():
    merged = merge_recipe({"steps": 10, "seed": 3}, {"steps": 2, "seed": None, "lr": None})
    assert merged == {"steps": 2, "seed": 3}
