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

    How it is computed: ``Unstructured`` selects by threshold in O(n) instead of sorting
    (see :func:`_remove_lowest`): the k-th smallest score ``t`` (``torch.kthvalue``, per row
    or over the flattened matrix), every score below ``t`` removed, and of the scores equal
    to ``t`` the lowest indices, as many as still needed; this is exactly the first ``k`` of
    the stable ascending sort, ties, -0.0 == +0.0 and ±inf included. A score holding NaN
    (which the sort places last) takes the sort itself. ``NM`` sorts each group of ``m``.
    """
    out_features, in_features = score.shape
    if isinstance(pattern, Unstructured):
        if scope == "row":
            k = int(in_features * pattern.sparsity)
            rows = score
        elif scope == "matrix":
            k = int(score.numel() * pattern.sparsity)
            rows = score.reshape(1, -1)
        else:
            raise ValueError(f"unknown scope {scope!r}")
        if not k:
            return torch.ones_like(score, dtype=torch.bool)
        if _has_nan(score):
            keep = torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
            keep.scatter_(1, torch.sort(rows, dim=1, stable=True).indices[:, :k], False)
            return keep.view(out_features, in_features)
        if rows.shape[0] == 1:
            return _remove_lowest(rows, k).logical_not_().view(out_features, in_features)
        keep = torch.empty(rows.shape, dtype=torch.bool, device=rows.device)
        step = max(1, ROW_CHUNK_ELEMENTS // in_features)
        for start in range(0, out_features, step):  # rows are independent: a few at a time
            keep[start : start + step] = _remove_lowest(rows[start : start + step], k).logical_not_()
        return keep
    keep = torch.ones_like(score, dtype=torch.bool)
    if isinstance(pattern, NM):
        pattern.check_fits(in_features)
        groups = score.reshape(out_features, in_features // pattern.m, pattern.m)
        prune = pattern.m - pattern.n_keep
        order = torch.sort(groups, dim=2, stable=True).indices[:, :, :prune]
        keep.view(out_features, -1, pattern.m).scatter_(2, order, False)
        return keep
    raise TypeError(f"not a sparsity pattern: {pattern!r}")


ROW_CHUNK_ELEMENTS = 1 << 20
"""Scores selected at once per row (scope "row"): the threshold's temporaries (``kthvalue``'s
copy of the values and their int64 indices, the comparison masks, the tie ranks: ~20 bytes an
element) stay near 20 MiB instead of 20 bytes per weight of the largest matrix (0.23 GB for a
2048 x 5632 ``up_proj``), which a streamed run's peak memory paid."""


def _has_nan(score: torch.Tensor) -> bool:
    """Whether ``score`` holds a NaN (then the threshold is undefined: the sort decides)."""
    return score.is_floating_point() and bool(torch.isnan(score).any())


def _remove_lowest(rows: torch.Tensor, k: int) -> torch.Tensor:
    """REMOVE mask of the ``k`` lowest scores of every row of ``rows`` (2-D, no NaN, ``k >= 1``).

    Equal to marking the first ``k`` indices of ``torch.sort(rows, dim=1, stable=True)``:
    with ``t`` the k-th smallest value of the row, every score ``< t`` comes before ``t`` in
    the sort, and the scores ``== t`` follow in index order, so the lowest-index ones fill
    the ``k - count(< t)`` places left. Comparisons treat -0.0 and +0.0 as equal, as the sort
    does.
    """
    threshold = torch.kthvalue(rows, k, dim=1, keepdim=True).values
    below = rows < threshold
    still_needed = k - below.sum(dim=1, keepdim=True)
    at_threshold = rows == threshold
    # int32 running count is exact while a row is shorter than 2**31.
    count_dtype = torch.int32 if rows.shape[1] < 2**31 else torch.int64
    tie_rank = torch.cumsum(at_threshold, dim=1, dtype=count_dtype)
    # in place: each temporary of a (out, in) matrix costs a mid-sized allocation the C
    # allocator keeps, and a streamed run's resident memory is what a memory limit counts
    at_threshold &= tie_rank <= still_needed
    return below.logical_or_(at_threshold)
