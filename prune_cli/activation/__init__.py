"""Activation sparsity: calibrated input sparsifiers for Linear layers (TEAL, WINA, R-Sparse)."""

from __future__ import annotations

from prune_cli.activation.methods import ActivationMethod, RSparse, Teal, Wina
from prune_cli.core.registry import Registry

ACTIVATION_METHODS: Registry[type[ActivationMethod]] = Registry("activation method")
ACTIVATION_METHODS.register(Teal.name, Teal)
ACTIVATION_METHODS.register(Wina.name, Wina)
ACTIVATION_METHODS.register(RSparse.name, RSparse)


def build_activation_method(name: str, options: dict | None = None) -> ActivationMethod:
    return ACTIVATION_METHODS.get(name).from_options(options)
