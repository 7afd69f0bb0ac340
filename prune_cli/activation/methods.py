"""Former home of the activation methods, kept while callers move to their own modules:
:mod:`prune_cli.activation.base` (the interface, :func:`quantile_threshold`,
:func:`column_norms`), :mod:`~prune_cli.activation.teal`, :mod:`~prune_cli.activation.wina`
and :mod:`~prune_cli.activation.rsparse`."""

from __future__ import annotations

from prune_cli.activation.base import ActivationMethod, column_norms, quantile_threshold
from prune_cli.activation.rsparse import RSparse
from prune_cli.activation.teal import Teal
from prune_cli.activation.wina import RELEASED_NORM_SOURCE, Wina

__all__ = ["RELEASED_NORM_SOURCE", "ActivationMethod", "RSparse", "Teal", "Wina", "column_norms", "quantile_threshold"]
