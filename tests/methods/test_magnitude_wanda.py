import pytest
import torch

from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.core.errors import RecipeError
from prune_cli.core.patterns import Unstructured
from prune_cli.methods import build_method


def stats_with_norms(norms):
    s = InputStats(len(norms), frozenset({Stat.SQ_NORM}))
    s.update(torch.tensor([norms], dtype=torch.float32))  # one token: ||X_j|| = |x_j|
    return s


def test_wanda_golden_prunes_column_zero():
    # scores |W| * ||X|| = [1*2, 3*1] = [2, 3] -> column 0 goes.
    # (|W| * ||X||^2 = [4, 3] would prune column 1: the norm is not squared.)
    w = torch.tensor([[1.0, 3.0]])
    res = build_method("wanda").prune(w, stats_with_norms([2.0, 1.0]), Unstructured(0.5))
    assert res.mask.tolist() == [[False, True]]
    assert res.weight.tolist() == [[0.0, 3.0]]


def test_magnitude_golden():
    w = torch.tensor([[1.0, -3.0, 0.5, 2.0]])
    res = build_method("magnitude").prune(w, None, Unstructured(0.5))
    assert res.mask.tolist() == [[False, True, False, True]]


def test_magnitude_matrix_scope_differs_from_row():
    w = torch.tensor([[10.0, 9.0], [1.0, 2.0]])
    row = build_method("magnitude").prune(w, None, Unstructured(0.5)).mask
    mat = build_method("magnitude", {"scope": "matrix"}).prune(w, None, Unstructured(0.5)).mask
    assert row.tolist() == [[True, False], [False, True]]
    assert mat.tolist() == [[True, True], [False, False]]


def test_unknown_option_did_you_mean():
    with pytest.raises(RecipeError, match="scop") as info:
        build_method("magnitude", {"scop": "row"})
    assert "'scope'" in info.value.hint
    with pytest.raises(RecipeError):
        build_method("magnitude", {"scope": "column"})


def test_wanda_uses_activation_norms():
    w = torch.ones(1, 4)
    res = build_method("wanda").prune(w, stats_with_norms([4.0, 1.0, 3.0, 2.0]), Unstructured(0.5))
    assert res.mask.tolist() == [[True, False, True, False]]
