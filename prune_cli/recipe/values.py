"""Reading one recipe value of a structured kind (file paths, Linear-name regexes, task names,
task-metric limits, ``auto`` numbers, strings), each a :class:`RecipeError` naming the key when
the value is not of that kind. The table (:mod:`.settings`) checks the plain kinds."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from prune_cli.core.errors import RecipeError
from prune_cli.core.errors import kind_of as _kind
from prune_cli.recipe import settings

_QUOTE_HINT = settings.QUOTE_HINT


def string_value(value: Any, key: str, optional: bool = False) -> str | None:
    """``value`` if it is a string (or ``None`` when ``optional``); else a :class:`RecipeError`
    naming ``key``. Names (method, device, ...) must be strings before they are looked up:
    a YAML list or mapping is unhashable and would escape as a TypeError."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        scalar = not isinstance(value, (list, dict, type(None)))
        raise RecipeError(f"{key} must be a string, got {_kind(value)}", hint=_QUOTE_HINT if scalar else None)
    return value


def auto_number(value: Any) -> float | None:
    """An ``auto-number`` setting's value (checked against the table): ``None`` for ``auto``."""
    return None if value in ("auto", None) else float(value)


def file_paths(value: Any, key: str) -> tuple[Path, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, Path)):
        value = [value]
    if not isinstance(value, list):
        raise RecipeError(f"{key} must be a list of file paths, got {_kind(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, (str, Path)):
            raise RecipeError(f"{key} must be a list of file paths, but item {i} is {_kind(item)}")
    return tuple(Path(v) for v in value)


REGEX_PREFIX = "re:"  # an explicit "this is a regular expression" mark; every pattern already is one


def linear_regexes(value: Any, key: str) -> tuple[str, ...]:
    """Regular expressions, searched in full Linear names. ``re:PATTERN`` is read as ``PATTERN``
    (the patterns are regular expressions anyway; taken literally, the prefix would match no
    name). An empty pattern (it would match every name) and a pattern listed twice are refused."""
    single = isinstance(value, str)
    if single:
        value = [value]
    if not isinstance(value, list):
        raise RecipeError(f"{key} must be a list of regular expressions, got {_kind(value)}")
    out: list[str] = []
    for i, pattern in enumerate(value):
        if not isinstance(pattern, str):
            raise RecipeError(f"{key} must be a list of regular expressions, but item {i} is {_kind(pattern)}")
        regex = pattern[len(REGEX_PREFIX):] if pattern.startswith(REGEX_PREFIX) else pattern
        if not regex:
            raise RecipeError(f"{key if single else f'{key}[{i}]'} is an empty pattern", hint="name Linears, e.g. 'mlp\\.down_proj'")
        try:
            re.compile(regex)
        except re.error as exc:
            raise RecipeError(f"{key}: bad regular expression {pattern!r} ({exc})") from None
        if regex in out:
            raise RecipeError(f"{key} lists {pattern!r} twice (items {out.index(regex)} and {i})")
        out.append(regex)
    return tuple(out)


def task_limits(value: Any, key: str) -> dict[str, float]:
    """``{TASK[:METRIC]: number}`` (a gate per task metric; at least the setting's minimum)."""
    minimum = settings.setting(key).minimum
    if not isinstance(value, dict):
        raise RecipeError(f"{key} must be a mapping of TASK[:METRIC] to a number, got {_kind(value)}")
    out = {}
    for name, limit in value.items():
        if not isinstance(name, str) or not name.split(":")[0]:
            raise RecipeError(f"{key}: task names must be strings, got {name!r}")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) \
                or (minimum is not None and limit < minimum):
            raise RecipeError(f"{key}.{name} must be a {'non-negative ' if minimum is not None else ''}number, got {limit!r}",
                              hint="e.g. --max-task-drop prune_cloze=0.05 (absolute, in the metric's units)")
        out[name] = float(limit)
    return out


def task_names(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise RecipeError(f"{key} must be a list of task names, got {value!r}", hint="e.g. tasks: [prune_cloze]")
    return tuple(dict.fromkeys(v.strip() for v in value))
