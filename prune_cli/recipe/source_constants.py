"""Read a constant from the module that defines it, without importing that module.

The recipe's closed choices are defined where they are used: backend names in
:mod:`prune_cli.gpu.backend`, dtype names in :mod:`prune_cli.core.dtypes`, BOS modes in
:mod:`prune_cli.calibrators.sampling`, the mixture-of-experts fallbacks in
:mod:`prune_cli.model.moe`. Those modules import torch, and the table of recipe keys
(:mod:`prune_cli.recipe.settings`) is read by the command line at start-up, where torch must not
be imported (``prune-cli --help`` stays fast). So the table reads each constant from its module's
source: one definition, no import. ``tests/unit/test_settings.py`` checks every value read here
equals the imported module's.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from typing import Any


@functools.cache
def _assignments(module: str) -> dict[str, ast.expr]:
    """The module-level ``NAME = value`` (and ``NAME: type = value``) expressions of ``module``."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find the source of {module}")
    with open(spec.origin, encoding="utf-8") as source:
        tree = ast.parse(source.read(), spec.origin)
    out: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            out[node.target.id] = node.value
    return out


def _expression(module: str, name: str) -> ast.expr:
    try:
        return _assignments(module)[name]
    except KeyError:
        raise LookupError(f"{module} assigns no module-level constant {name}") from None


def literal(module: str, name: str) -> Any:
    """The value of ``name = <literal>`` in ``module`` (a string, number, tuple, ...)."""
    return ast.literal_eval(_expression(module, name))


def literal_keys(module: str, name: str) -> tuple:
    """The keys of ``name = {<literal>: ..., ...}`` in ``module`` (the values may be anything)."""
    node = _expression(module, name)
    if not isinstance(node, ast.Dict) or any(key is None for key in node.keys):
        raise LookupError(f"{module}.{name} is not a dict display with literal keys")
    return tuple(ast.literal_eval(key) for key in node.keys if key is not None)
