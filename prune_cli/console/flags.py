"""Values of command-line options that need more than Typer's parsing: ``-O KEY=VALUE`` method
options, ``TASK[:METRIC]=NUMBER`` gates, ``auto|<float>``; a bad one is a usage error (exit
code 2) naming the option."""

from __future__ import annotations

from typing import Optional

import typer
import yaml

from prune_cli.recipe.settings import cli_help, setting


def parse_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings into a dict; values are read as YAML scalars (numbers, bools).

    A value YAML cannot read (``scope=[``, an unclosed quote, a ``!!python/...`` tag) is a
    usage error naming the option and the value, not an internal error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--option")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise typer.BadParameter(f"cannot read the value of {key.strip()!r} ({value!r}): {problem} "
                                     "(quote a text value, e.g. -O 'key=\"text\"')", param_hint="--option") from None
    return out


def parse_limits(items: list[str] | None, flag: str) -> dict[str, float]:
    """``["task=0.4", "task:acc_norm=0.5"]`` -> ``{"task": 0.4, "task:acc_norm": 0.5}``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(f"expected TASK[:METRIC]=NUMBER, got {item!r}", param_hint=flag) from None
    return out


def auto_number(value: Optional[str]) -> str | float | None:
    """``auto`` or a number, as the recipe's ``auto-number`` settings take them."""
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither 'auto' nor a number") from None


def recipe_option(key: str, *flags: str, **kwargs):
    """An option of compress or sweep that sets the recipe key ``key``: unset (``None``, the recipe's
    value or the default) unless given; its help, choices and default from the table of recipe keys
    (:func:`prune_cli.recipe.settings.cli_help`)."""
    return typer.Option(None, *flags, help=cli_help(key), **kwargs)


def eval_option(key: str, *flags: str, text: str | None = None, **kwargs):
    """An option of eval for the recipe key ``key``: the table's default (Typer shows it) and
    minimum, and the table's help unless ``text`` words it for eval."""
    s = setting(key)
    if s.minimum is not None:
        kwargs.setdefault("min", s.minimum)
    return typer.Option(s.default, *flags, help=text or s.help, **kwargs)
