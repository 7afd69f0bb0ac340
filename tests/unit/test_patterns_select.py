import pytest
import torch

from prune_cli.core.errors import PatternError
from prune_cli.core.patterns import NM, Unstructured, parse_pattern
from prune_cli.methods import select


def test_parse_pattern_types():
    assert parse_pattern("unstructured", 0.5) == Unstructured(0.5)
    assert parse_pattern("2:4", None) == NM(2, 4)
    assert parse_pattern(" 4:8 ", 0.5) == NM(4, 8)
    assert NM(2, 4).target_sparsity == 0.5
    assert NM(1, 4).target_sparsity == 0.75  # N is KEPT


@pytest.mark.parametrize("text,sparsity", [("2:4", 0.6), ("5:4", None), ("0:4", None), ("abc", 0.5), ("unstructured", None)])
def test_parse_pattern_rejects(text, sparsity):
    with pytest.raises(PatternError):
        parse_pattern(text, sparsity)


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5])
def test_sparsity_range(s):
    with pytest.raises(PatternError):
        Unstructured(s)


def test_nm_must_divide_width():
    with pytest.raises(PatternError, match="does not divide"):
        NM(2, 4).check_fits(6, "x")


def test_select_exact_per_row_counts():
    score = torch.rand(7, 33)
    keep = select(score, Unstructured(0.5))
    assert keep.dtype == torch.bool
    assert (keep.logical_not().sum(1) == int(33 * 0.5)).all()
    # the removed ones are the lowest of their row
    for row in range(7):
        removed = score[row][~keep[row]]
        kept = score[row][keep[row]]
        assert removed.max() <= kept.min()


def test_select_matrix_scope():
    score = torch.rand(8, 16)
    keep = select(score, Unstructured(0.25), scope="matrix")
    assert int((~keep).sum()) == int(8 * 16 * 0.25)
    assert score[~keep].max() <= score[keep].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_select_nm_exact_group_counts(n, m):
    score = torch.rand(5, 4 * m)
    keep = select(score, NM(n, m))
    assert (keep.reshape(5, -1, m).sum(-1) == n).all()


def test_select_ties_broken_by_index():
    score = torch.ones(2, 8)
    keep = select(score, Unstructured(0.5))
    # among equal scores the lower index is removed first
    assert keep[0].tolist() == [False] * 4 + [True] * 4
    keep = select(torch.ones(1, 8), NM(2, 4))
    assert keep[0].tolist() == [False, False, True, True] * 2


def test_select_zero_sparsity_keeps_all():
    assert select(torch.rand(3, 10), Unstructured(0.0)).all()
