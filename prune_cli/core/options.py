"""Strict option parsing shared by weight and activation methods: a method is a frozen dataclass
whose fields are its recipe options."""

from __future__ import annotations

import dataclasses
from typing import Any

from prune_cli.core.errors import RecipeError
from prune_cli.core.registry import closest


def build_from_options(cls, options: dict[str, Any] | None):
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in options:
        if key not in fields:
            close = closest(key, fields)
            hint = f"did you mean {close!r}?" if close else f"options of {cls.name}: {', '.join(fields) or 'none'}"
            raise RecipeError(f"unknown option {key!r} for method {cls.name}", hint=hint)
    try:
        obj = cls(**options)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"bad options for method {cls.name}: {exc}") from None
    obj.validate()
    return obj
