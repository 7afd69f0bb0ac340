"""Mask selection: the KEEP mask that removes the lowest-scoring weights under a pattern."""

from __future__ import annotations

import torch

from prune_cli.core.patterns import NM, SparsityPattern, Unstructured


def select(score: torch.Tensor, pattern: SparsityPattern, scope: str = "row") -> torch.Tensor:
    """KEEP mask that removes the lowest-scoring weights under ``pattern``.

    ``score``: ``(out, in)``; higher = more important.

    * ``Unstructured(s)``, scope "row": in every output row remove exactly ``floor(in * s)``
      weights; scope "matrix": remove ``floor(out * in * s)`` over the whole matrix.
    * ``NM(n, m)``: in every group of ``m`` consecutive inputs of a row keep exactly ``n``.

    Ties are broken by index: among equal scores the lower index is removed first (a stable
    ascending sort), so every backend produces the same mask bit for bit.
    """
    out_features, in_features = score.shape
    keep = torch.ones_like(score, dtype=torch.bool)
    if isinstance(pattern, Unstructured):
        if scope == "row":
            k = int(in_features * pattern.sparsity)
            if k:
                order = torch.sort(score, dim=1, stable=True).indices[:, :k]
                keep.scatter_(1, order, False)
        elif scope == "matrix":
            k = int(score.numel() * pattern.sparsity)
            if k:
                order = torch.sort(score.reshape(-1), stable=True).indices[:k]
                keep.view(-1)[order] = False
        else:
            raise ValueError(f"unknown scope {scope!r}")
        return keep
    if isinstance(pattern, NM):
        pattern.check_fits(in_features)
        groups = score.reshape(out_features, in_features // pattern.m, pattern.m)
        prune = pattern.m - pattern.n_keep
        order = torch.sort(groups, dim=2, stable=True).indices[:, :, :prune]
        keep.view(out_features, -1, pattern.m).scatter_(2, order, False)
        return keep
    raise TypeError(f"not a sparsity pattern: {pattern!r}")
