"""prune_cli/recipe/settings.py is the one table of recipe keys: the defaults, the checks, the CLI help
and the recipe a run records all come from (or are checked against) it."""

from __future__ import annotations

import pytest

from prune_cli.recipe import settings
from prune_cli.recipe.config import DEFAULTS, resolve
from prune_cli.core.errors import RecipeError


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
