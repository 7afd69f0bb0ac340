"""The torch backend (the reference of every kernel) against select / InputStats / formulas."""

from __future__ import annotations

import pytest
import torch

from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.core.patterns import NM, Unstructured
from prune_cli.core.selection import select
from prune_cli.gpu.backend import Backend
from prune_cli.gpu.torch_backend import TorchBackend
from prune_cli.methods.wanda import Wanda

B = TorchBackend()


def test_is_a_backend():
    assert isinstance(B, Backend)
    assert B.name == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_input_stats_equals_input_stats_update(dtype):
    x = (torch.randn(3, 37, 130) * 3 + 1).to(dtype)
    stats = InputStats(130, frozenset({Stat.MEAN_VAR, Stat.SQ_NORM}))
    stats.update(x)
    total, squares = B.input_stats(x, want_sum=True, want_sq=True)
    assert total.dtype == squares.dtype == torch.float32 and total.shape == (130,)
    assert torch.equal(total, stats.sum) and torch.equal(squares, stats.sum_sq)
    x64 = x.double().reshape(-1, 130)
    torch.testing.assert_close(total.double(), x64.sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(squares.double(), x64.square().sum(0), rtol=1e-5, atol=1e-4)


def test_input_stats_only_what_is_wanted():
    x = torch.randn(10, 4)
    assert B.input_stats(x, want_sum=False, want_sq=True)[0] is None
    assert B.input_stats(x, want_sum=True, want_sq=False)[1] is None
    assert B.input_stats(x, want_sum=False, want_sq=False) == (None, None)


def tie_heavy(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, shape, generator=g).float()


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.3), NM(2, 4), NM(1, 4), NM(4, 8)])
@pytest.mark.parametrize("scope", ["row", "matrix"])
def test_select_mask_is_select(pattern, scope):
    score = tie_heavy((6, 40))
    if isinstance(pattern, NM) and scope == "matrix":
        scope = "row"
    assert torch.equal(B.select_mask(score, pattern, scope), select(score, pattern, scope))


def test_select_mask_ties_lower_index_removed_first():
    score = torch.ones(1, 6)
    assert B.select_mask(score, Unstructured(0.5)).tolist() == [[False, False, False, True, True, True]]
    assert B.select_mask(torch.ones(1, 4), NM(2, 4)).tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)])
def test_wanda_mask_equals_wanda_score_select(dtype, pattern):
    weight = (tie_heavy((8, 64), 1) - 1.5).to(dtype)
    x = torch.randn(50, 64)
    stats = InputStats(64, Wanda.required_stats)
    stats.update(x)
    want = select(Wanda().score(weight, stats), pattern)
    assert torch.equal(B.wanda_mask(weight, stats.norm, pattern), want)


def test_wanda_golden_norm_is_not_squared():
    # W = [1, 3], ||X|| = [2, 1]: scores [2, 3] -> column 0 goes (|W| ||X||^2 would give [4, 3])
    mask = B.wanda_mask(torch.tensor([[1.0, 3.0]]), torch.tensor([2.0, 1.0]), Unstructured(0.5))
    assert mask.tolist() == [[False, True]]


def gemv_reference(x, weight_t, mask, u=None, sv=None):
    m = mask.double()
    y = (x.double() * m) @ weight_t.double()
    if u is not None:
        y = y + u.double() @ (sv.double() @ (x.double() * (1 - m)))
    return y


def tolerance(dtype, x, weight_t, u=None, sv=None):
    unit = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    mag = x.double().abs() @ weight_t.double().abs()
    if u is not None:
        mag = mag + u.double().abs() @ (sv.double().abs() @ x.double().abs())
    return 4 * unit * mag + 1e-6 * mag + 1e-30


def keeps(in_features, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(in_features, generator=g) < 0.5
    return {
        "bool": mask,
        "int64": mask.nonzero().squeeze(1),
        "int32": mask.nonzero().squeeze(1).int(),
        "none": torch.zeros(in_features, dtype=torch.bool),
        "all": torch.ones(in_features, dtype=torch.bool),
    }


@pytest.mark.parametrize("dtype,x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_sparse_gemv_formula(dtype, x_dtype):
    in_features, out_features = 97, 61
    weight_t = torch.randn(in_features, out_features).to(dtype)
    x = torch.randn(in_features).to(x_dtype)
    for name, keep in keeps(in_features).items():
        y = B.sparse_gemv(x, weight_t, keep)
        assert y.shape == (out_features,) and y.dtype == dtype, name
        mask = torch.zeros(in_features, dtype=torch.bool)
        mask[keep.long() if keep.dtype != torch.bool else keep.nonzero().squeeze(1)] = True
        ref = gemv_reference(x, weight_t, mask)
        assert ((y.double() - ref).abs() <= tolerance(dtype, x, weight_t)).all(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rsparse_gemv_formula(dtype):
    in_features, out_features, rank = 97, 61, 5
    weight_t = torch.randn(in_features, out_features).to(dtype)
    u = torch.randn(out_features, rank).to(dtype)
    sv = torch.randn(rank, in_features).to(dtype)
    x = torch.randn(in_features).to(dtype)
    for name, keep in keeps(in_features, 1).items():
        y = B.rsparse_gemv(x, weight_t, keep, u, sv)
        assert y.shape == (out_features,) and y.dtype == dtype, name
        mask = torch.zeros(in_features, dtype=torch.bool)
        mask[keep.long() if keep.dtype != torch.bool else keep.nonzero().squeeze(1)] = True
        ref = gemv_reference(x, weight_t, mask, u, sv)
        assert ((y.double() - ref).abs() <= tolerance(dtype, x, weight_t, u, sv)).all(), name


def test_rsparse_with_all_kept_is_the_dense_product():
    weight_t, x = torch.randn(20, 7), torch.randn(20)
    y = B.rsparse_gemv(x, weight_t, torch.ones(20, dtype=torch.bool), torch.randn(7, 3), torch.randn(3, 20))
    torch.testing.assert_close(y, x @ weight_t)


def test_gemv_shape_errors():
    weight_t = torch.randn(10, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        B.sparse_gemv(torch.randn(9), weight_t, torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep mask"):
        B.sparse_gemv(torch.randn(10), weight_t, torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool mask or an integer index list"):
        B.sparse_gemv(torch.randn(10), weight_t, torch.ones(10))
    with pytest.raises(ValueError, match="low-rank factors"):
        B.rsparse_gemv(torch.randn(10), weight_t, torch.ones(10, dtype=torch.bool), torch.randn(4, 2), torch.randn(3, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_activation_threshold_is_the_quantile_threshold(dtype):
    """The k-th smallest of |x| (* scale) over all entries: the value quantile_threshold (the
    TEAL / WINA threshold) has always used, and a member of the scores."""
    from prune_cli.activation.base import quantile_threshold

    g = torch.Generator().manual_seed(2)
    x = (torch.randint(-4, 5, (3, 41, 70), generator=g).float() * 0.25).to(dtype)
    scale = torch.rand(70, generator=g) * 3
    for s in (None, scale):
        scores = (x.abs() if s is None else x.abs() * s).reshape(-1)
        for sparsity in (0.01, 0.5, 0.77, 1.0):
            k = round(sparsity * x.numel())
            tau = B.activation_threshold(x, s, k)
            assert isinstance(tau, float) and tau == quantile_threshold(x, sparsity, s)
            assert tau == float(scores.sort().values[k - 1])
    with pytest.raises(ValueError, match="outside"):
        B.activation_threshold(x, None, 0)
    with pytest.raises(ValueError, match="outside"):
        B.activation_threshold(x, scale, x.numel() + 1)
