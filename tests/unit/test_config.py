from pathlib import Path

import pytest
import yaml

from prune_cli.config import load_recipe, resolve
from prune_cli.errors import PatternError, RecipeError, UnknownNameError
from prune_cli.patterns import NM, Unstructured

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def write(tmp_path, data):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    config = resolve(load_recipe(recipe), {})
    assert config.method or config.activation
    assert config.to_recipe()["version"] == 1


def test_expected_recipes_shipped():
    names = {p.name for p in RECIPES.glob("*.yaml")}
    assert {"wanda-50.yaml", "wanda-2of4.yaml", "magnitude-50.yaml"} <= names


def test_shipped_activation_recipes():
    c = resolve(load_recipe(RECIPES / "wina-greedy-50.yaml"), {})
    assert c.method is None and c.activation.method == "wina" and c.activation.allocation == "greedy"
    assert c.activation.sparsity == 0.5
    c = resolve(load_recipe(RECIPES / "wanda-2of4-wina-40.yaml"), {})
    assert c.method == "wanda" and c.pattern == NM(2, 4) and c.activation.sparsity == 0.4


def test_shipped_recipe_values():
    c = resolve(load_recipe(RECIPES / "wanda-2of4.yaml"), {})
    assert c.method == "wanda" and c.pattern == NM(2, 4)
    c = resolve(load_recipe(RECIPES / "magnitude-50.yaml"), {})
    assert c.method == "magnitude" and c.pattern == Unstructured(0.5)


def test_unknown_top_level_key_did_you_mean(tmp_path):
    p = write(tmp_path, {"version": 1, "method": "wanda", "sparsty": 0.5})
    with pytest.raises(RecipeError, match="sparsty") as info:
        load_recipe(p)
    assert "sparsity" in info.value.hint


def test_unknown_nested_key(tmp_path):
    p = write(tmp_path, {"version": 1, "method": "wanda", "sparsity": 0.5, "calibration": {"sample": 3}})
    with pytest.raises(RecipeError, match="calibration.'sample'|sample"):
        load_recipe(p)


def test_version_checked(tmp_path):
    with pytest.raises(RecipeError, match="version"):
        load_recipe(write(tmp_path, {"method": "wanda"}))
    with pytest.raises(RecipeError, match="version"):
        load_recipe(write(tmp_path, {"version": 2, "method": "wanda"}))


def test_unknown_method_did_you_mean():
    with pytest.raises(UnknownNameError) as info:
        resolve(None, {"method": "wandaa", "sparsity": 0.5})
    assert "wanda" in info.value.hint


def test_cli_overrides_recipe():
    recipe = load_recipe(RECIPES / "wanda-50.yaml")
    c = resolve(recipe, {"sparsity": 0.7, "calibration": {"samples": 4}})
    assert c.pattern == Unstructured(0.7) and c.calibration.samples == 4
    # an N:M pattern on the command line replaces the recipe's unstructured sparsity
    c = resolve(recipe, {"pattern": "2:4"})
    assert c.pattern == NM(2, 4)
    # a sparsity on the command line replaces a recipe's N:M pattern
    c = resolve(load_recipe(RECIPES / "wanda-2of4.yaml"), {"sparsity": 0.3})
    assert c.pattern == Unstructured(0.3)


@pytest.mark.parametrize(
    "overrides,error",
    [
        ({"method": "wanda", "sparsity": 1.0}, PatternError),
        ({"method": "wanda", "sparsity": -0.2}, PatternError),
        ({"method": "wanda", "sparsity": 0.7, "pattern": "2:4"}, PatternError),
        ({"method": "wanda", "sparsity": 0.5, "device": "tpu"}, RecipeError),
        ({"method": "wanda", "sparsity": 0.5, "calibration": {"samples": 0}}, RecipeError),
        ({"sparsity": 0.5}, RecipeError),
        ({"method": "wanda", "sparsity": 0.5, "targets": {"include": ["("]}}, RecipeError),
    ],
)
def test_bad_values(overrides, error):
    with pytest.raises(error):
        resolve(None, overrides)


def test_sparsity_must_be_number(tmp_path):
    with pytest.raises(RecipeError):
        resolve({"version": 1, "method": "wanda", "sparsity": "half"}, {})
