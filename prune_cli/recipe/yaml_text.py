"""A recipe file's text and its YAML: UTF-8 text (a binary or mis-encoded file named as such)
parsed by a safe loader that refuses a key given twice in one mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from prune_cli.core.errors import RecipeError


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, at any nesting level.

    PyYAML keeps the last value silently, so ``sparsity: 0.5`` ... ``sparsity: 0.7`` would run
    at 0.7 with nobody noticing. Keys brought in by a ``<<: *anchor`` merge are not counted:
    overriding them with an explicit key is what merge keys are for.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, line, seen[key])
                    seen[key] = line
                except TypeError:  # an unhashable key: SafeConstructor reports it below
                    continue
        return super().construct_mapping(node, deep=deep)


def recipe_text(path: Path) -> str:
    """The recipe file decoded as UTF-8, or a :class:`RecipeError` saying why it is not text."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise RecipeError(f"{path} is a binary file, not a YAML recipe",
                          hint="pass a YAML file, e.g. recipes/wanda-50.yaml")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{path}: not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset {exc.start})",
            hint="save the recipe as UTF-8",
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text did
