"""The JSON Schema of a version-1 recipe, generated from the table of recipe keys.

Every key's type, allowed values, range, default and description come from
:data:`prune_cli.recipe.settings.SETTINGS`; method names from the method registries the table
names. The schema is checked in as ``prune_cli/schemas/recipe.v1.schema.json`` (shipped in the
wheel, for editors and other tools); regenerate it after changing the table::

    python -m prune_cli.recipe.schema > prune_cli/schemas/recipe.v1.schema.json

A test checks the file is up to date and that every recipe in ``recipes/`` validates. The schema
says what each key takes; the rules that relate several keys (an N:M pattern implies its
sparsity, OWL needs an unstructured pattern, a gate needs the evaluation, ...) are
:func:`prune_cli.recipe.config.resolve`'s.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from prune_cli.recipe.settings import SETTINGS, Setting

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "https://prune-cli/schemas/recipe.v1.schema.json"  # as the report schemas name theirs
SCHEMA_FILE = "recipe.v1.schema.json"  # in prune_cli/schemas/

_NULLABLE_SECTIONS = ("activation",)  # `activation: null` = no activation sparsity (how a report records it)
_SECTION_HELP = {
    "targets": "Which Linear modules inside the decoder blocks are pruned.",
    "layerwise": "How the sparsity is spread over the blocks.",
    "activation": "Activation sparsity (after any weight method); null: none.",
    "calibration": "The calibration text and its windows.",
    "evaluation": "Perplexity on held-out text and lm-eval tasks, dense and compressed.",
    "gates": "Quality gates checked after the evaluation (exit code 3 when one fails).",
    "moe": "Mixture-of-experts models: experts that see few calibration tokens.",
}


def registry_names(reference: str) -> list[str]:
    """The names registered in ``"module:NAME"`` (a :class:`~prune_cli.core.registry.Registry`)."""
    module, _, name = reference.partition(":")
    return list(getattr(importlib.import_module(module), name))


def _number(s: Setting, json_type: str = "number") -> dict:
    out: dict[str, Any] = {"type": json_type}
    if s.minimum is not None:
        out["exclusiveMinimum" if s.open_minimum else "minimum"] = s.minimum
    if s.maximum is not None:
        out["exclusiveMaximum" if s.open_maximum else "maximum"] = s.maximum
    return out


def _one_or_list(item: dict) -> dict:
    return {"anyOf": [item, {"type": "array", "items": item}]}


def _overrides_item() -> dict:
    sparsity = next(s for s in SETTINGS if s.key == "sparsity")
    block = {"type": "integer", "minimum": 0}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["sparsity"],
        "anyOf": [{"required": ["blocks"]}, {"required": ["match"]}],
        "properties": {
            "blocks": {**_one_or_list(block), "description": "Block indices (0 is the first decoder block)."},
            "match": {"type": "string", "minLength": 1, "description": "A regular expression searched in the Linear's full name."},
            "sparsity": {**_number(sparsity), "description": "The sparsity of the Linears the entry selects."},
        },
    }


def _value_schema(s: Setting) -> dict:
    """What the setting's value may be (without the default and description)."""
    kind = s.kind
    if kind == "choice":
        out: dict[str, Any] = {"enum": list(s.choices)}
    elif kind == "str" and s.registries:
        out = {"enum": [name for reference in s.registries for name in registry_names(reference)]}
    elif kind == "str":
        out = {"type": "string"}
    elif kind == "int":
        out = _number(s, "integer")
    elif kind == "number":
        out = _number(s)
    elif kind == "bool":
        out = {"type": "boolean"}
    elif kind == "auto-number":
        out = {"anyOf": [{"const": "auto"}, _number(s)]}
    elif kind == "paths":
        out = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]}
    elif kind == "names":
        out = _one_or_list({"type": "string", "pattern": "\\S"})
    elif kind == "regexes":
        out = _one_or_list({"type": "string", "minLength": 1})
    elif kind == "mapping":
        out = {"type": "object"}
    elif kind == "task-limits":
        limit = {"type": "number"} if s.minimum is None else {"type": "number", "minimum": s.minimum}
        out = {"type": "object", "propertyNames": {"pattern": "^[^:]+"}, "additionalProperties": limit}
    elif kind == "overrides":
        out = {"type": "array", "items": _overrides_item()}
    else:  # pragma: no cover - Setting refuses unknown kinds
        raise ValueError(f"{s.key}: no schema for kind {kind!r}")
    if s.optional:
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        elif "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
        else:
            out["type"] = [out["type"], "null"]
    return out


def _setting_schema(s: Setting) -> dict:
    if s.key == "version":
        return {"const": s.default, "description": f"{s.help} This schema describes version {s.default}."}
    return {**_value_schema(s), "default": s.default, "description": s.help}


def recipe_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a version-1 recipe: every key of the table, no other."""
    root: dict[str, Any] = {
        "$schema": SCHEMA_DIALECT,
        "$id": SCHEMA_ID,
        "title": "prune-cli recipe, version 1",
        "description": "A prune-cli recipe (YAML or JSON). Generated from prune_cli/recipe/settings.py by "
                       "`python -m prune_cli.recipe.schema`; do not edit by hand.",
        "type": "object",
        "additionalProperties": False,
        "required": ["version"],
        "properties": {},
    }
    for s in SETTINGS:
        *parents, leaf = s.key.split(".")
        node = root
        for depth, part in enumerate(parents):
            props = node["properties"]
            if part not in props:
                section = ".".join(parents[:depth + 1])
                nullable = section in _NULLABLE_SECTIONS
                props[part] = {"type": ["object", "null"] if nullable else "object", "additionalProperties": False,
                               "properties": {}, "description": _SECTION_HELP.get(section, "")}
            node = props[part]
        node["properties"][leaf] = _setting_schema(s)
    return root


def schema_text() -> str:
    """The schema as the checked-in file holds it (two-space indents, a final newline)."""
    return json.dumps(recipe_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(schema_text(), end="")
