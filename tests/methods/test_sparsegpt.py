import pytest
import torch

from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.core.patterns import NM, Unstructured
from prune_cli.methods import build_method
from prune_cli.methods.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from tests.methods.helpers import correlated_inputs, recon_error, stats_for


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4)])
def test_reconstruction_beats_magnitude_and_wanda(pattern):
    x = correlated_inputs(512, 64)
    w = torch.randn(32, 64)
    stats = stats_for(x)
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        res = build_method(name).prune(w, stats, pattern)
        assert abs((~res.mask).float().mean().item() - pattern.target_sparsity) < 0.02
        errors[name] = recon_error(w, res.weight, x)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"] * 1.0001


@torch.no_grad()
def slow_obs_reference(w: torch.Tensor, H: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Row by row, column by column, with an explicit inverse of H restricted to the columns not
    yet processed: prune column j (if masked) and move the remaining weights by the OBS update
    delta_F = -(w_j / [H_F^-1]_jj) [H_F^-1]_{:, j}. Mask: the lowest w_j^2 / [H_{F_j}^-1]_jj over
    the whole matrix (block = width), F_j = {j, ..., in-1}."""
    out_f, in_f = w.shape
    d = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0].item() for j in range(in_f)], dtype=torch.float64)
    saliency = w.double() ** 2 / d
    k = int(w.numel() * sparsity)
    prune = torch.zeros_like(w, dtype=torch.bool)
    prune.view(-1)[torch.sort(saliency.reshape(-1), stable=True).indices[:k]] = True
    result = w.double().clone()
    for r in range(out_f):
        row = result[r]
        for j in range(in_f):
            if prune[r, j]:
                Hinv_F = torch.linalg.inv(H[j:, j:])
                row[j:] -= row[j] / Hinv_F[0, 0] * Hinv_F[:, 0]
                row[j] = 0.0
    return result


def test_matches_slow_obs_reference_with_zero_damp_and_full_block():
    x = correlated_inputs(400, 12, seed=3).double()
    w = torch.randn(4, 12, dtype=torch.float64)
    stats = InputStats(12, frozenset({Stat.GRAM}))
    stats.update(x.float())
    H = stats.hessian.double()
    ours = build_method("sparsegpt", {"percdamp": 0.0, "blocksize": 12}).prune(w.float(), stats, Unstructured(0.5))
    ref = slow_obs_reference(w, H, 0.5)
    assert torch.equal(ours.weight == 0, ref == 0)
    torch.testing.assert_close(ours.weight.double(), ref, atol=2e-3, rtol=1e-3)


def test_dead_input_channels():
    x = correlated_inputs(256, 16)
    x[:, 3] = 0
    w = torch.randn(8, 16)
    res = build_method("sparsegpt").prune(w, stats_for(x), Unstructured(0.5))
    assert torch.isfinite(res.weight).all()
    assert (res.weight[:, 3] == 0).all()


def test_nm_exact_and_dtype_kept():
    x = correlated_inputs(256, 32)
    w = torch.randn(8, 32).to(torch.bfloat16)
    res = build_method("sparsegpt", {"blocksize": 10}).prune(w, stats_for(x), NM(2, 4))
    assert res.weight.dtype == torch.bfloat16
    assert (res.mask.reshape(8, -1, 4).sum(-1) == 2).all()
    assert ((res.weight != 0) <= res.mask).all()


def test_cholesky_shared_between_consumers():
    stats = stats_for(correlated_inputs(128, 16))
    a = inverse_hessian_factor(stats, 0.01)
    b = inverse_hessian_factor(stats, 0.01)
    assert a[0] is b[0]


def test_blocks_not_multiple_of_width():
    x = correlated_inputs(300, 50)
    w = torch.randn(6, 50)
    res = sparsegpt_prune(w, *inverse_hessian_factor(stats_for(x), 0.01), Unstructured(0.5), blocksize=16)
    assert abs((~res.mask).sum().item() - 150) <= 4
