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
    if isinstance(pattern, NM):
        pattern.check_fits(in_features)
        groups = score.reshape(out_features, in_features // pattern.m, pattern.m)
        prune = pattern.m - pattern.n_keep
        if pattern.m <= RANKED_GROUP_MAX and not _has_nan(score):
            return (_group_ranks(groups) >= prune).view(out_features, in_features)
        keep = torch.ones_like(score, dtype=torch.bool)
        order = torch.sort(groups, dim=2, stable=True).indices[:, :, :prune]
        keep.view(out_features, -1, pattern.m).scatter_(2, order, False)
        return keep
    raise TypeError(f"not a sparsity pattern: {pattern!r}")


RANKED_GROUP_MAX = 8
"""Largest ``M`` whose groups :func:`_group_ranks` ranks by pairwise comparison (``M`` passes
over the scores) instead of sorting them: 5.7 against 9.8 ms for a 576 x 1536 2:4 selection on
two cores. Above it the sort's ``M log M`` wins."""


def _group_ranks(groups: torch.Tensor) -> torch.Tensor:
    """Position of every score in its group's stable ascending sort (``(..., m)`` -> int8 of the
    same shape; no NaN): ``rank_j = #{i : g_i < g_j} + #{i < j : g_i == g_j}``. The ``M - N``
    lowest ranks of a group are the entries its stable sort puts first (ties by index, and
    -0.0 == +0.0 as the sort compares)."""
    m = groups.shape[-1]
    rank = torch.zeros(groups.shape, dtype=torch.int8, device=groups.device)
    for i in range(m):
        g_i = groups[..., i : i + 1]
        precedes = g_i < groups  # g_i before g_j
        precedes[..., i + 1 :] |= g_i == groups[..., i + 1 :]  # a tie: the lower index first
        precedes[..., i] = False
        rank += precedes
    return rank


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
    if rows.shape[0] == 1:
        threshold = kth_smallest(rows.reshape(-1), k).reshape(1, 1)
    else:
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


SAMPLE_SIZE = 1 << 16
"""Scores :func:`kth_smallest` reads to bracket the k-th one."""


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """``values.kthvalue(k).values`` of a 1-D tensor (``1 <= k <= numel``; NaN sorts last), as a
    0-d tensor: the same number, computed in a few passes instead of a full selection.

    ``torch.kthvalue`` copies the whole tensor and runs a selection over it (14 ms for 0.9M
    scores on two cores: most of an ALPS iteration's projection). :func:`bracketed_kth` finds
    the answer in a small window of the values first (~4.5 ms there); where its bracket misses,
    the full ``kthvalue`` decides.
    """
    if values.numel() > 4 * SAMPLE_SIZE:
        found = bracketed_kth(values, k)
        if found is not None:
            return found
    return values.kthvalue(k).values


def bracketed_kth(values: torch.Tensor, k: int) -> torch.Tensor | None:
    """The k-th smallest of ``values`` (1-D) from a window around it, or None if the window
    misses it.

    A sample of ``SAMPLE_SIZE`` values at fixed pseudo-random positions (seed 0: the same
    positions every call; a strided sample is not enough, as a stride that divides a row length
    reads the same few channels of flattened activations, whose scales differ by orders of
    magnitude) gives two bracketing values ``lo <= hi``: the sample's ranks ``r -+ 4 sqrt(m)``
    around its own ``k/n`` quantile ``r``. One pass counts ``n_lo = #(v < lo)``, one gathers the window ``lo <= v <= hi``. If
    ``n_lo < k <= n_lo + len(window)``, every value below the window precedes the answer in the
    sorted order and every value above it follows, so the answer is the ``(k - n_lo)``-th
    smallest of the window. NaN is in no window (``<`` and ``<=`` are false for it) and sorts
    last in both orders, so the rule holds with NaN too; ties and -0.0 == +0.0 compare as the
    sort does.
    """
    n = values.numel()
    positions = torch.randint(0, n, (SAMPLE_SIZE,), generator=torch.Generator().manual_seed(0))
    sample = values[positions.to(values.device)]
    m = sample.numel()
    margin = 4 * int(m**0.5)
    rank = (k * m) // n
    lo = sample.kthvalue(min(m, max(1, rank - margin))).values
    hi = sample.kthvalue(min(m, max(1, rank + margin + 1))).values
    n_lo = int(torch.count_nonzero(values < lo))
    window = values[(values >= lo) & (values <= hi)]
    if n_lo < k <= n_lo + window.numel():
        return window.kthvalue(k - n_lo).values
    return None
