"""Magnitude pruning: score ``S_ij = |W_ij|``, compared per output row (default) or over the
whole matrix (``scope: matrix``, the classic global-per-layer variant). N:M is per group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prune_cli.calibrators.stats import InputStats
from prune_cli.core.errors import RecipeError
from prune_cli.methods.base import ScoreMethod


@dataclass(frozen=True)
class Magnitude(ScoreMethod):
    """Magnitude: drop the smallest |W_ij| per row (or over the whole matrix), no calibration."""

    name = "magnitude"
    dsnot_base = True
    scope: str = "row"

    def validate(self) -> None:
        if self.scope not in ("row", "matrix"):
            raise RecipeError(f"magnitude scope must be 'row' or 'matrix', got {self.scope!r}")

    def selection_scope(self) -> str:
        return self.scope

    def score(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        return weight.abs().float()
