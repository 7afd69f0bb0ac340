import copy
import dataclasses
import datetime
import re
from pathlib import Path

import pytest
import yaml

from prune_cli.core.errors import BadInputError, PatternError, RecipeError, UnknownNameError
from prune_cli.core.patterns import NM, Unstructured
from prune_cli.recipe.config import DEFAULTS, load_recipe, resolve

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


# --- recipe files that are not UTF-8 YAML, duplicate keys, wrongly typed values -----------------


def write_bytes(tmp_path, data: bytes):
    p = tmp_path / "r.yaml"
    p.write_bytes(data)
    return p


def test_recipe_not_utf8(tmp_path):
    p = write_bytes(tmp_path, b"version: 1\nmethod: wanda\nname: caf\xe9\n")
    with pytest.raises(RecipeError, match=r"not UTF-8 text \(invalid byte 0xe9 at offset 34\)") as info:
        load_recipe(p)
    assert str(p) in str(info.value) and info.value.exit_code == 2


def test_recipe_with_nul_bytes(tmp_path):
    p = write_bytes(tmp_path, b"\x7fELF\x02\x01\x01\x00\x00\x00version: 1\n")
    with pytest.raises(RecipeError, match="is a binary file, not a YAML recipe") as info:
        load_recipe(p)
    assert str(p) in str(info.value)


def test_duplicate_top_level_key(tmp_path):
    p = write_bytes(tmp_path, b"version: 1\nmethod: wanda\nsparsity: 0.5\nmethod: magnitude\n")
    with pytest.raises(RecipeError, match="duplicate key 'method' at line 4") as info:
        load_recipe(p)
    assert str(p) in str(info.value) and "line 2" in str(info.value)


def test_duplicate_nested_key(tmp_path):
    p = write_bytes(tmp_path, b"version: 1\nmethod: wanda\nsparsity: 0.5\ncalibration: {seed: 1, seed: 2}\n")
    with pytest.raises(RecipeError, match="duplicate key 'seed' at line 4") as info:
        load_recipe(p)
    assert str(p) in str(info.value)
    block = b"version: 1\nmethod: wanda\nsparsity: 0.5\nlayerwise:\n  method: owl\n  m: 5\n  m: 7\n"
    with pytest.raises(RecipeError, match="duplicate key 'm' at line 7"):
        load_recipe(write_bytes(tmp_path, block))


def test_yaml_merge_key_may_be_overridden(tmp_path):
    # `<<: *anchor` then an explicit key is YAML's way to override: not a duplicate
    p = write_bytes(tmp_path, b"version: 1\nmethod: wanda\nsparsity: 0.5\n"
                              b"calibration: &c {seqlen: 128}\nevaluation: {<<: *c, seqlen: 256}\n")
    c = resolve(load_recipe(p), {})
    assert c.calibration.seqlen == 128 and c.evaluation.seqlen == 256


def test_method_list_is_a_recipe_error(tmp_path):
    p = write_bytes(tmp_path, b"version: 1\nmethod: [wanda]\nsparsity: 0.5\n")
    with pytest.raises(RecipeError, match="method must be a string, got a list"):
        resolve(load_recipe(p), {})


def test_unquoted_nm_pattern_is_a_recipe_error(tmp_path):
    # YAML 1.1 reads an unquoted 2:4 as the sexagesimal integer 124
    p = write_bytes(tmp_path, b"version: 1\nmethod: wanda\npattern: 2:4\n")
    with pytest.raises(RecipeError, match="pattern must be a string, got an integer") as info:
        resolve(load_recipe(p), {})
    assert "quote" in info.value.hint


def _key_paths(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _key_paths(value, prefix + (key,))


WRONG_VALUES = [None, True, False, 0, -1, 7, 0.5, float("nan"), float("inf"), "", "x", "auto", "(", [], [1],
                ["x"], [None], [[1]], [{"a": 1}], {}, {"a": 1}, {1: 2}, {"x": [1]}, datetime.date(2024, 1, 1),
                b"\x00\xff", {1, 2}]
BASE_RECIPES = [
    {"version": 1, "method": "wanda", "sparsity": 0.5},
    {"version": 1, "method": "wanda", "sparsity": 0.5, "layerwise": {"method": "owl"},
     "overrides": [{"blocks": [0], "sparsity": 0.3}]},
    {"version": 1, "activation": {"method": "wina", "sparsity": 0.4}},
    {"version": 1, "method": "teal", "sparsity": 0.4},
]


def _resolve_only_bad_input(recipe, overrides=None):
    try:
        resolve(recipe, overrides or {})
    except BadInputError as exc:
        assert exc.message and "\n" not in str(exc)


@pytest.mark.parametrize("key", [".".join(p) for p in _key_paths(DEFAULTS)])
def test_fuzz_wrong_types_give_recipe_errors(key):
    """Every wrongly typed value at every key, in a recipe or in the flags' overrides, is a
    RecipeError / BadInputError, never a crash."""
    path = key.split(".")
    for base in BASE_RECIPES:
        for value in WRONG_VALUES:
            recipe = copy.deepcopy(base)
            node = recipe
            for part in path[:-1]:
                node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
            node[path[-1]] = copy.deepcopy(value)
            _resolve_only_bad_input(recipe)
            flags = {"method": "wanda", "sparsity": 0.5} if base.get("method") else {}
            flags_node = flags
            for part in path[:-1]:
                flags_node = flags_node.setdefault(part, {})
            flags_node[path[-1]] = copy.deepcopy(value)
            _resolve_only_bad_input(base, flags)


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt", "dsnot", "teal", "wina", "rsparse"])
def test_fuzz_wrong_method_options_give_recipe_errors(method):
    from prune_cli.activation import ACTIVATION_METHODS
    from prune_cli.methods import WEIGHT_METHODS

    registry = ACTIVATION_METHODS if method in ACTIVATION_METHODS else WEIGHT_METHODS
    fields = [f.name for f in dataclasses.fields(registry.get(method))] + ["nope", 1]
    for field in fields:
        for value in WRONG_VALUES:
            _resolve_only_bad_input({"version": 1, "method": method, "sparsity": 0.5,
                                     "method_options": {field: copy.deepcopy(value)}})
            if registry is ACTIVATION_METHODS:
                _resolve_only_bad_input({"version": 1, "activation": {"method": method, "sparsity": 0.5,
                                                                      "options": {field: copy.deepcopy(value)}}})


def test_fuzz_wrong_override_entries_give_recipe_errors():
    for key in ("blocks", "match", "sparsity"):
        for value in WRONG_VALUES:
            entry = {"blocks": [0], "sparsity": 0.3, key: copy.deepcopy(value)}
            _resolve_only_bad_input({"version": 1, "method": "wanda", "sparsity": 0.5, "overrides": [entry]})
    for value in WRONG_VALUES:
        _resolve_only_bad_input({"version": 1, "method": "wanda", "sparsity": 0.5, "overrides": value})
        _resolve_only_bad_input({"version": 1, "method": "wanda", "sparsity": 0.5, "overrides": [value]})


@pytest.mark.parametrize("value,message", [
    ({"targets": 5}, "targets must be a mapping"),
    ({"calibration": [1]}, "calibration must be a mapping"),
    ({"method_options": 3}, "method_options must be a mapping"),
    ({"activation": {"method": "wina", "sparsity": 0.4, "options": [1]}}, "activation.options must be a mapping"),
    ({"evaluation": {"text": 5}}, "evaluation.text must be a list of file paths"),
    ({"calibration": {"text": [5]}}, "calibration.text must be a list of file paths"),
    ({"targets": {"include": [5]}}, "targets.include must be a list of regular expressions"),
    ({"sparsity": "half"}, "sparsity must be a number"),
    ({"name": ["a"]}, "name must be a string"),
    ({"calibration": {"dataset": 5}}, "calibration.dataset must be a string"),
    ({"calibration": {"column": 1}}, "calibration.column must be a string"),
    ({"device": ["cpu"]}, "device must be a string"),
    ({"backend": {"a": 1}}, "backend must be a string"),
    ({"layerwise": {"method": ["owl"]}}, "layerwise.method must be a string"),
    ({"activation": {"method": "wina", "sparsity": 0.4, "allocation": 1}}, "activation.allocation must be a string"),
    ({"activation": {"method": ["wina"], "sparsity": 0.4}}, "activation.method must be a string"),
    ({"method_options": {1: 2}}, "method_options"),
])
def test_wrong_types_are_named(value, message):
    recipe = {"version": 1, "method": "wanda", "sparsity": 0.5, **value}
    with pytest.raises(RecipeError, match=re.escape(message)):
        resolve(recipe, {})


def test_target_patterns_re_prefix_empty_and_duplicates():
    base = {"method": "wanda", "sparsity": 0.5}
    config = resolve(None, {**base, "targets": {"include": [r"re:mlp\."], "exclude": ["re:down"]},
                            "overrides": [{"match": "re:up_proj$", "sparsity": 0.3}]})
    assert config.targets.include == (r"mlp\.",) and config.targets.exclude == ("down",)
    assert config.overrides[0].match == "up_proj$"
    with pytest.raises(RecipeError, match=r"targets.exclude\[1\] is an empty pattern"):
        resolve(None, {**base, "targets": {"exclude": ["q_proj", "re:"]}})
    with pytest.raises(RecipeError, match="overrides\\[0\\].match is an empty pattern"):
        resolve(None, {**base, "overrides": [{"match": "", "sparsity": 0.3}]})
    with pytest.raises(RecipeError, match=r"targets.include lists 're:mlp' twice \(items 0 and 1\)"):
        resolve(None, {**base, "targets": {"include": ["mlp", "re:mlp"]}})


def test_every_target_pattern_must_select():
    from prune_cli.recipe.config import Targets

    names = [f"model.layers.{b}.{n}" for b in range(2) for n in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")]
    Targets(include=(r"mlp\.",), exclude=("down",)).check_selections(names)
    with pytest.raises(RecipeError, match=r"targets.include\[1\] 'k_proj' matches no Linear") as info:
        Targets(include=("q_proj", "k_proj")).check_selections(names)
    assert "self_attn.q_proj, mlp.up_proj, mlp.down_proj" in info.value.hint
    with pytest.raises(RecipeError, match=r"targets.exclude\[0\] 'q_proj' excludes nothing: it matches none of"):
        Targets(include=("mlp",), exclude=("q_proj",)).check_selections(names)
    with pytest.raises(RecipeError, match=r"targets.exclude\[0\] 'gate' excludes nothing: it matches no Linear"):
        Targets(exclude=("gate",)).check_selections(names)
