"""prune_cli/recipe/settings.py is the one table of recipe keys: the defaults, the checks, the CLI help
and the recipe a run records all come from (or are checked against) it."""

from __future__ import annotations

import pytest

from prune_cli.core.errors import RecipeError
from prune_cli.recipe import settings
from prune_cli.recipe.config import DEFAULTS, resolve


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name not in ("method_options", "activation.options"):
            out |= _leaves(value, name + ".")
        elif isinstance(value, dict) and not value and name not in ("method_options", "activation.options",
                                                                     "gates.min_task_score", "gates.max_task_drop"):
            out |= _leaves(value, name + ".")
        else:
            out.add(name)
    return out


def test_the_defaults_and_the_recorded_recipe_have_exactly_the_settings_keys():
    keys = {s.key for s in settings.SETTINGS}
    assert DEFAULTS == settings.defaults()
    assert _leaves(DEFAULTS) == keys
    recorded = resolve(None, {"method": "wanda", "sparsity": 0.5}).to_recipe()
    recorded_keys = _leaves(recorded) | {"layerwise.m", "layerwise.lambda", "layerwise.validation_windows"}  # uniform: method only
    recorded_keys |= {"activation.method", "activation.sparsity", "activation.allocation", "activation.options",
                      "activation.max_tokens"} - recorded_keys if recorded["activation"] is None else set()
    assert recorded_keys - {"activation"} == keys
    with_activation = resolve(None, {"method": "wina", "sparsity": 0.4}).to_recipe()
    assert set(with_activation["activation"]) == {k.split(".")[1] for k in keys if k.startswith("activation.")}


@pytest.mark.parametrize("setting", [s for s in settings.SETTINGS if s.kind == "choice"], ids=lambda s: s.key)
def test_every_closed_choice_is_checked_with_did_you_mean(setting):
    *parents, leaf = setting.key.split(".")
    wrong = setting.choices[-1][:-1] + "x"
    recipe: dict = {"version": 1, "method": "wanda", "sparsity": 0.5}
    node = recipe
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = wrong
    with pytest.raises(RecipeError, match=f"{setting.key} must be one of {', '.join(setting.choices)}") as info:
        resolve(recipe, None)
    assert "did you mean" in (info.value.hint or "")


def test_the_cli_help_is_the_settings_help_with_default_and_choices():
    import typer

    from prune_cli.cli import app

    command = typer.main.get_command(app).commands["compress"]
    helps = {opt: p.help for p in command.params if getattr(p, "param_type_name", "") == "option" for opt in p.opts}
    assert helps["--calib-samples"] == settings.cli_help("calibration.samples") == "Calibration windows (default 32)."
    assert helps["--device"] == "Where blocks are computed: auto, cpu, cuda (default auto)."
    assert helps["--eval-seqlen"].endswith(f"(default {settings.setting('evaluation.seqlen').default}).")


def test_closed_choices_are_the_ones_the_modules_act_on():
    """One definition (prune_cli.core.names, which imports no torch): the table's choices are the
    names the backend resolver, the dtypes, the BOS sampler and the MoE fallback act on."""
    from prune_cli.calibrators.sampling import BOS_MODES
    from prune_cli.core.dtypes import DTYPES
    from prune_cli.gpu.backend import BACKEND_NAMES
    from prune_cli.model import moe

    assert settings.choices("backend") == BACKEND_NAMES
    assert settings.choices("dtype") == settings.choices("save_dtype") == ("auto", *DTYPES)
    assert settings.choices("bos") == BOS_MODES
    assert settings.choices("moe.fallback") == moe.FALLBACKS
    assert settings.setting("moe.fallback").default == moe.DEFAULT_FALLBACK
    assert settings.setting("moe.min_tokens").default == moe.DEFAULT_MIN_TOKENS


def test_the_method_help_names_every_registered_method():
    from prune_cli.activation import ACTIVATION_METHODS
    from prune_cli.methods import WEIGHT_METHODS

    weights, activations = settings.setting("method").help.removeprefix("Method: ").split(";")
    assert set(weights.split(" (")[0].split(", ")) == set(WEIGHT_METHODS)
    assert set(activations.strip().split(" (")[0].split(", ")) == set(ACTIVATION_METHODS)
    named = settings.setting("activation.method").help.removeprefix("Activation sparsity method: ").rstrip(".")
    assert set(named.split(", ")) == set(ACTIVATION_METHODS)


def test_the_config_defaults_are_the_table_defaults():
    import dataclasses

    from prune_cli.recipe.config import ActivationConfig, CalibrationConfig, EvaluationConfig, OwlSettings, RunConfig

    def recorded(value):
        return [str(v) for v in value] if isinstance(value, tuple) else value

    for cls, section in ((CalibrationConfig, "calibration"), (EvaluationConfig, "evaluation")):
        for f in dataclasses.fields(cls):
            assert recorded(getattr(cls(), f.name)) == settings.setting(f"{section}.{f.name}").default, f.name
    activation = ActivationConfig("wina", 0.4)
    for leaf in ("options", "allocation", "max_tokens"):
        assert getattr(activation, leaf) == settings.setting(f"activation.{leaf}").default
    assert OwlSettings().validation_windows == settings.setting("layerwise.validation_windows").default
    config = RunConfig(method=None, pattern=None)
    for key in ("device", "dtype", "save_dtype", "backend", "bos", "name", "description", "method_options"):
        assert getattr(config, key) == settings.setting(key).default, key
    assert config.moe.to_dict() == {"min_tokens": settings.setting("moe.min_tokens").default,
                                    "fallback": settings.setting("moe.fallback").default}


def test_an_owl_value_is_checked_against_its_range():
    for key, value in (("m", 0.5), ("lambda", 0.7), ("m", "x")):
        with pytest.raises(RecipeError, match=rf"layerwise.{key} must be 'auto' or a number in \["):
            resolve({"version": 1, "method": "wanda", "sparsity": 0.5, "layerwise": {"method": "owl", key: value}}, None)
