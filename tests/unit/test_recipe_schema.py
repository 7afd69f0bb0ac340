"""The recipe's JSON Schema (prune_cli/schemas/recipe.v1.schema.json) is generated from the table of
recipe keys (prune_cli/recipe/settings.py), is up to date, and every shipped recipe validates against
it; every recipe's resolved config round-trips through the recipe it records."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from prune_cli.recipe import settings
from prune_cli.recipe.config import load_recipe, resolve
from prune_cli.recipe.llmcompressor import is_llmcompressor_recipe
from prune_cli.recipe.schema import SCHEMA_FILE, recipe_schema, schema_text

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
CHECKED_IN = ROOT / "prune_cli" / "schemas" / SCHEMA_FILE
VALIDATOR = jsonschema.Draft202012Validator(json.loads(CHECKED_IN.read_text()))


def test_the_checked_in_schema_is_the_generated_one():
    assert CHECKED_IN.read_text() == schema_text(), \
        "regenerate it: python -m prune_cli.recipe.schema > prune_cli/schemas/recipe.v1.schema.json"
    jsonschema.Draft202012Validator.check_schema(recipe_schema())


def _property(schema: dict, key: str) -> dict:
    node = schema
    for part in key.split("."):
        node = node["properties"][part]
    return node


def test_every_setting_is_in_the_schema_with_its_default_and_help():
    schema = recipe_schema()
    for s in settings.SETTINGS:
        node = _property(schema, s.key)
        assert node["description"].startswith(s.help)
        if s.key != "version":
            assert node["default"] == s.default
    assert VALIDATOR.is_valid(settings.defaults())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    data = yaml.safe_load(recipe.read_text())
    if is_llmcompressor_recipe(data):  # another tool's format: what it is read as must validate
        data = load_recipe(recipe)
    VALIDATOR.validate(data)


@pytest.mark.parametrize("recipe", [*RECIPES, None], ids=lambda p: "defaults" if p is None else p.name)
def test_the_recorded_recipe_round_trips(recipe):
    """resolve(config.to_recipe()) is the config itself, and the recorded recipe validates."""
    config = resolve(load_recipe(recipe), None) if recipe else resolve(None, {"method": "wanda", "sparsity": 0.5})
    recorded = config.to_recipe()
    VALIDATOR.validate(json.loads(json.dumps(recorded)))
    assert resolve(recorded, None) == config


@pytest.mark.parametrize("bad", [
    {"sparsty": 0.5},
    {"device": "gpu"},
    {"method": "wandaa"},
    {"calibration": {"samples": 0}},
    {"layerwise": {"m": 2000}},
    {"activation": {"sparsity": 1.0}},
    {"overrides": [{"sparsity": 0.3}]},
    {"gates": {"max_task_drop": {"prune_cloze": -0.1}}},
])
def test_the_schema_refuses_what_resolve_refuses(bad):
    assert not VALIDATOR.is_valid({"version": 1, "method": "wanda", "sparsity": 0.5, **bad})
