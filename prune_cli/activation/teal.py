"""TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in LLMs"): ``m_i = 1[|x_i| > tau]``
with ``tau`` the ``s``-quantile of ``|X|`` over all calibration entries (exact quantile of the
magnitudes; TEAL's released code assumes a symmetric distribution of ``x`` and misses the
target, e.g. 51% achieved at 50% here)."""

from __future__ import annotations

from dataclasses import dataclass

from prune_cli.activation.base import ActivationMethod, quantile_threshold
from prune_cli.activation.modules import SparseInputLinear


@dataclass(frozen=True)
class Teal(ActivationMethod):
    """TEAL: magnitude thresholds on the input of every Linear."""

    name = "teal"

    def fit(self, linear, x, sparsity, cache=None, backend=None):
        """``tau`` = the ``sparsity``-quantile of ``|x|`` over all ``(n, in)`` entries."""
        return SparseInputLinear(linear, quantile_threshold(x, sparsity, backend=backend))
