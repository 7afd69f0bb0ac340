"""The method catalog: help texts and the ``prune-cli methods`` listing, built from what the
registered methods declare (their names, docstrings and recipe options) instead of lists of
names kept by hand.

The functions that cover both weight and activation methods take the registries as arguments:
``prune_cli.methods`` and ``prune_cli.activation`` are sibling layers that do not import each
other, so the CLI (which sits above both) hands them in.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass

from prune_cli.core.registry import Registry
from prune_cli.methods.base import WEIGHT_METHODS, dsnot_bases

# The section titles of ``prune-cli methods``.
WEIGHT_TITLE = "weight methods (--method; prune the weights)"
ACTIVATION_TITLE = "activation methods (--method; skip small inputs at run time)"
INDENT = " " * 13  # continuation lines of the listing


def method_summary(cls) -> str:
    """The first line of a method class's own docstring (a dataclass without one gets a
    generated ``Name(field: type = default)`` text, which is no description)."""
    doc = cls.__dict__.get("__doc__") or ""
    if not doc.strip() or doc.startswith(f"{cls.__name__}("):
        return "(no description)"
    return doc.strip().splitlines()[0]


def method_options(cls) -> str:
    """``name=default, ...`` of a method's recipe options (``-O`` / ``method_options:``)."""
    return ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls) if f.init)


@dataclass(frozen=True)
class MethodRow:
    """One line of the catalog: a registered name, its one-line description, its options."""

    name: str
    summary: str
    options: str


def method_rows(registry: Registry) -> list[MethodRow]:
    """The catalog rows of every method in ``registry``, sorted by name."""
    return [MethodRow(name, method_summary(registry.get(name)), method_options(registry.get(name))) for name in registry]


def catalog_lines(sections: Iterable[tuple[str, Registry]], width: int) -> list[str]:
    """The text of ``prune-cli methods``: per ``(title, registry)`` section its title, then per
    method ``  name  summary`` and ``options: ...`` with a hanging indent, wrapped to ``width - 1``
    columns."""
    lines: list[str] = []

    def say(first: str, text: str) -> None:
        lines.extend(textwrap.wrap(text, width - 1, initial_indent=first, subsequent_indent=INDENT))

    for title, registry in sections:
        lines.append(title)
        for row in method_rows(registry):
            say(f"  {row.name:<10} ", row.summary)
            say(INDENT, f"options: {row.options or '(none)'}")
    return lines


def names_text(names: Iterable[str], last: str = ", ") -> str:
    """``a, b, c`` (``last`` joins the final two, e.g. ``" or "``)."""
    names = list(names)
    if len(names) < 2:
        return "".join(names)
    return ", ".join(names[:-1]) + last + names[-1]


def weight_method_names() -> list[str]:
    """The weight methods in registration order (the order help texts name them in)."""
    return WEIGHT_METHODS.in_registration_order()


def dsnot_base_help() -> str:
    """The help of ``--base``: the methods declaring ``dsnot_base``."""
    return f"Base method of dsnot: {names_text(dsnot_bases(), ' or ')}."


def method_help(activation_methods: Registry) -> str:
    """The help of the ``method`` recipe key (``--method``): every weight method, then every
    activation method of ``activation_methods`` (``prune_cli.activation.ACTIVATION_METHODS``)."""
    return (f"Method: {names_text(weight_method_names())} (weights); "
            f"{names_text(activation_methods.in_registration_order())} (activation sparsity).")
