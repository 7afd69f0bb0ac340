"""The threshold selection of ``select`` gives the same masks as the stable sort it replaced."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from prune_cli.core import selection
from prune_cli.core.patterns import NM, SparsityPattern, Unstructured
from prune_cli.core.selection import select

INF = float("inf")
NAN = float("nan")
SHAPES = [(1, 1), (1, 7), (1, 64), (7, 1), (5, 33), (16, 16), (3, 129), (64, 31)]
SPARSITIES = [0.0, 0.001, 0.01, 0.5, 0.9, 0.999]
SCOPES = ["row", "matrix"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference_select(score: torch.Tensor, pattern: SparsityPattern, scope: str = "row") -> torch.Tensor:
    """The sort-based ``select`` as it was before the threshold selection (kept verbatim)."""
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


def assert_same(score: torch.Tensor, sparsity: float, scope: str) -> None:
    pattern = Unstructured(sparsity)
    got = select(score, pattern, scope)
    want = reference_select(score, pattern, scope)
    assert got.dtype == torch.bool and got.shape == score.shape
    assert torch.equal(got, want), (score.dtype, tuple(score.shape), sparsity, scope)


def _generator(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scope", SCOPES)
def test_random_scores(dtype, shape, scope):
    score = torch.randn(shape, generator=_generator("random", dtype, shape, scope)).to(dtype)
    for sparsity in SPARSITIES:
        assert_same(score, sparsity, scope)
        assert_same(score.abs(), sparsity, scope)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("levels", [1, 2, 3, 10])
def test_heavy_ties(dtype, shape, scope, levels):
    score = torch.randint(0, levels, shape, generator=_generator("ties", dtype, shape, scope, levels)).to(dtype)
    for sparsity in SPARSITIES:
        assert_same(score, sparsity, scope)


@pytest.mark.parametrize("value", [0.0, -0.0, 1.5, -3.0, INF, -INF])
@pytest.mark.parametrize("scope", SCOPES)
def test_all_equal(value, scope):
    score = torch.full((6, 25), value)
    for sparsity in SPARSITIES:
        assert_same(score, sparsity, scope)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", SCOPES)
def test_signed_zeros(dtype, scope):
    # -0.0 and +0.0 compare equal: the sort keeps them in index order, so must the threshold.
    gen = _generator("zeros", dtype, scope)
    signs = torch.randint(0, 2, (9, 40), generator=gen).bool()
    score = torch.where(signs, torch.tensor(-0.0), torch.tensor(0.0))
    mixed = torch.where(torch.rand(9, 40, generator=gen) < 0.3, torch.randn(9, 40, generator=gen), score)
    for candidate in (score.to(dtype), mixed.to(dtype)):
        for sparsity in SPARSITIES:
            assert_same(candidate, sparsity, scope)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", SCOPES)
def test_infinities(dtype, scope):
    gen = _generator("inf", dtype, scope)
    score = torch.randint(-1, 2, (8, 37), generator=gen).float()
    score = torch.where(
        score > 0, torch.tensor(INF), torch.where(score < 0, torch.tensor(-INF), torch.randn(8, 37, generator=gen))
    )
    for sparsity in SPARSITIES:
        assert_same(score.to(dtype), sparsity, scope)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("nan_share", [0.01, 0.3, 1.0])
def test_nan_counts_as_largest(dtype, scope, nan_share):
    gen = _generator("nan", dtype, scope, nan_share)
    score = torch.randint(0, 3, (7, 41), generator=gen).float()
    score[torch.rand(7, 41, generator=gen) < nan_share] = NAN
    score[0, 0] = NAN  # at least one NaN
    score[1, :5] = torch.tensor([INF, -INF, 0.0, -0.0, NAN])
    for sparsity in SPARSITIES:
        assert_same(score.to(dtype), sparsity, scope)


def test_sparsity_zero_is_a_no_op():
    score = torch.randn(4, 9)
    for scope in SCOPES:
        assert select(score, Unstructured(0.0), scope).all()
    # floor(1 * 0.5) == 0 weights of a one-column row: nothing removed
    assert select(score[:, :1], Unstructured(0.5), "row").all()


def test_large_row_and_matrix_match():
    gen = _generator("large")
    score = torch.randn(32, 4096, generator=gen)
    score[:, ::7] = torch.randint(0, 4, (32, len(range(0, 4096, 7))), generator=gen).float()
    for sparsity, scope in itertools.product([0.3, 0.5, 0.7], SCOPES):
        assert_same(score, sparsity, scope)


def test_non_contiguous_score():
    score = torch.randint(0, 3, (40, 24), generator=_generator("transposed")).float().t()
    for sparsity in SPARSITIES:
        assert_same(score, sparsity, "row")
        # the sort path could not view a transposed mask flat; compare with the contiguous copy
        pattern = Unstructured(sparsity)
        assert torch.equal(select(score, pattern, "matrix"), reference_select(score.contiguous(), pattern, "matrix"))


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4), NM(4, 8)])
def test_nm_unchanged(pattern):
    score = torch.randint(0, 3, (6, 32), generator=_generator("nm", pattern)).float()
    score[0, 0] = NAN
    assert torch.equal(select(score, pattern), reference_select(score, pattern))


def test_unknown_scope_and_pattern():
    with pytest.raises(ValueError, match="unknown scope"):
        select(torch.randn(2, 4), Unstructured(0.5), "column")
    with pytest.raises(TypeError, match="not a sparsity pattern"):
        select(torch.randn(2, 4), "2:4", "row")  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_rows_selected_a_few_at_a_time_match(monkeypatch, chunk):
    """Row scope selects ``ROW_CHUNK_ELEMENTS // in`` rows at a time (a bounded peak memory):
    every chunking, a row at a time to all at once, gives the sort's mask."""
    monkeypatch.setattr(selection, "ROW_CHUNK_ELEMENTS", chunk)
    gen = _generator("chunks", chunk)
    score = torch.randint(0, 5, (37, 24), generator=gen).float()  # heavy ties across chunk edges
    score[5] = float("inf")
    for sparsity in [0.01, 0.5, 0.9]:
        assert_same(score, sparsity, "row")
        assert_same(score.t().contiguous().t(), sparsity, "row")  # non-contiguous rows too


def _kth_cases() -> list[torch.Tensor]:
    gen = _generator("kth", 0)
    return [
        torch.randn(5000, generator=gen).abs(),
        torch.randint(0, 4, (3000,), generator=gen).float(),  # heavy ties
        torch.cat([torch.full((700,), NAN), torch.randn(900, generator=gen)]),  # NaN sorts last
        torch.randn(2000, generator=gen).sort().values,  # already sorted
        torch.cat([torch.full((500,), INF), -torch.zeros(500), torch.zeros(500), torch.full((9,), -INF)]),
        torch.randn(4096, generator=gen).to(torch.bfloat16),
    ]


@pytest.mark.parametrize("case", range(6))
def test_kth_smallest_is_kthvalue(monkeypatch, case):
    """The bracketed k-th value equals ``kthvalue``'s for every k, on ties, NaN, +-0, +-inf and
    sorted input; a sample of 64 makes small tensors take the bracketed path."""
    monkeypatch.setattr(selection, "SAMPLE_SIZE", 64)
    values = _kth_cases()[case]
    n = values.numel()
    for k in sorted({1, 2, 7, n // 3, n // 2, n - 300, n - 1, n}):
        got, want = selection.kth_smallest(values, k), values.kthvalue(k).values
        assert (torch.isnan(got) and torch.isnan(want)) or got == want, (k, got, want)


def test_bracket_misses_fall_back_to_kthvalue(monkeypatch):
    """A sample that cannot see the values around the k-th (a sample of one) misses;
    ``kth_smallest`` then gives ``kthvalue``'s answer."""
    monkeypatch.setattr(selection, "SAMPLE_SIZE", 1)
    values = torch.randn(1000, generator=_generator("miss", 0))
    assert selection.bracketed_kth(values, 500) is None
    assert selection.kth_smallest(values, 500) == values.kthvalue(500).values


def test_the_bracket_holds_on_flattened_activations():
    """Flattened activations (tokens x channels) whose channel scales differ by 10^4, with a
    row length (576) that a stride of n / 2^16 = 144 divides: the sample still brackets the
    k-th value at every quantile (a strided sample read 4 of the 576 channels and missed)."""
    gen = _generator("activations", 0)
    scales = torch.logspace(-2, 2, 576)[torch.randperm(576, generator=gen)]
    values = (torch.randn(16384, 576, generator=gen) * scales).abs().reshape(-1)
    n = values.numel()
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        k = int(q * n)
        found = selection.bracketed_kth(values, k)
        assert found is not None and found == values.kthvalue(k).values, q


def test_matrix_scope_on_the_bracketed_path(monkeypatch):
    """Matrix scope above the sampling size: the mask is the stable sort's, ties included."""
    monkeypatch.setattr(selection, "SAMPLE_SIZE", 32)
    score = torch.randint(0, 50, (40, 70), generator=_generator("matrix-bracket", 0)).float()
    for sparsity in [0.01, 0.5, 0.9]:
        assert_same(score, sparsity, "matrix")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4), NM(3, 4), NM(1, 2), NM(4, 8), NM(2, 8), NM(8, 16)])
def test_nm_ranked_groups_match_the_sort(pattern, dtype):
    """N:M without NaN ranks each group by comparisons (M <= 8) and sorts above that: both give
    the stable sort's mask, with heavy ties, -0.0 beside +0.0 and +-inf."""
    gen = _generator("nm-ranked", pattern, dtype)
    score = torch.randint(-2, 3, (9, 64), generator=gen).to(dtype)
    score[1] = -0.0
    score[2, ::3] = INF
    score[3, ::5] = -INF
    score[4] = torch.randn(64, generator=gen).to(dtype)
    keep = select(score, pattern)
    assert keep.dtype == torch.bool
    assert torch.equal(keep, reference_select(score, pattern))
