"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs").

Score ``S_ij = |W_ij| * ||X_j||_2`` where ``||X_j||_2`` is the L2 norm of input channel ``j``
over all calibration tokens; weights are compared within each output row (per group of M
for N:M). Note the norm is *not* squared: with ``W = [1, 3]`` and norms ``[2, 1]`` the scores
are ``[2, 3]`` and column 0 is pruned (``|W| * ||X||^2`` would give ``[4, 3]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.core.patterns import SparsityPattern
from prune_cli.methods.base import PruneResult, ScoreMethod


@dataclass(frozen=True)
class Wanda(ScoreMethod):
    """Wanda: drop the smallest |W_ij| * ||X_j||_2 per output row (Sun et al. 2023)."""

    name = "wanda"
    required_stats = frozenset({Stat.SQ_NORM})
    dsnot_base = True

    def score(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        if stats is None:
            raise RuntimeError("wanda needs input statistics")
        return weight.abs().float() * stats.norm.to(weight.device).unsqueeze(0)

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern, backend=None) -> PruneResult:
        if backend is None:
            return super().prune(weight, stats, pattern)
        if stats is None:
            raise RuntimeError("wanda needs input statistics")
        mask = backend.wanda_mask(weight, stats.norm.to(weight.device), pattern)  # score fused, never stored
        return PruneResult(weight * mask, mask)  # bool promotes per element, no float copy of the mask
