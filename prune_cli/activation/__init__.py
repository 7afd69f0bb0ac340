"""Activation sparsity: calibrated input sparsifiers for Linear layers (TEAL, WINA, R-Sparse).
Adding a method: a file with an :class:`ActivationMethod` subclass declaring what it is
(patterns, runtime form, model transform), plus one ``register`` line here. The registration
order is the order help texts name them in."""

from __future__ import annotations

from prune_cli.activation.base import (
    ACTIVATION_METHODS,
    ActivationMethod,
    RuntimeForm,
    activation_method_help,
    build_activation_method,
)
from prune_cli.activation.rsparse import RSparse
from prune_cli.activation.teal import Teal
from prune_cli.activation.wina import Wina

ACTIVATION_METHODS.register(Teal.name, Teal)
ACTIVATION_METHODS.register(Wina.name, Wina)
ACTIVATION_METHODS.register(RSparse.name, RSparse)

__all__ = ["ACTIVATION_METHODS", "ActivationMethod", "RuntimeForm", "activation_method_help", "build_activation_method"]
