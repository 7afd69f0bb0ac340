import pytest
import torch

from prune_cli.methods import build_method
from prune_cli.patterns import NM, Unstructured
from tests.methods.helpers import correlated_inputs, recon_error, stats_for

PATTERNS = [Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(4, 8)]


def layer(seed=0, out_f=48, in_f=64):
    x = correlated_inputs(600, in_f, seed=seed, mean_shift=1.0)
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(out_f, in_f, generator=g), x, stats_for(x, tokens_per_window=8)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mode", ["guarded", "reference"])
@pytest.mark.parametrize("base", ["magnitude", "wanda", "sparsegpt"])
def test_counts_per_row_and_group_unchanged(pattern, mode, base):
    w, x, stats = layer()
    base_res = build_method(base).prune(w, stats, pattern)
    res = build_method("dsnot", {"base": base, "mode": mode}).prune(w, stats, pattern)
    assert torch.equal(res.mask.sum(1), base_res.mask.sum(1))
    if isinstance(pattern, NM):
        assert (res.mask.reshape(w.shape[0], -1, pattern.m).sum(-1) == pattern.n_keep).all()
    assert ((res.weight != 0) <= res.mask).all()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("base", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_guarded_never_increases_reconstruction_error(pattern, base, seed):
    w, x, stats = layer(seed)
    before = recon_error(w, build_method(base).prune(w, stats, pattern).weight, x)
    res = build_method("dsnot", {"base": base, "mode": "guarded"}).prune(w, stats, pattern)
    after = recon_error(w, res.weight, x)
    assert after <= before * (1 + 1e-6)


def test_guarded_improves_magnitude_base():
    w, x, stats = layer()
    before = recon_error(w, build_method("magnitude").prune(w, stats, Unstructured(0.6)).weight, x)
    after = recon_error(w, build_method("dsnot", {"base": "magnitude"}).prune(w, stats, Unstructured(0.6)).weight, x)
    assert after < 0.99 * before


def test_swaps_happen_and_reference_reduces_mean_error():
    w, x, stats = layer()
    mu = stats.mean * stats.tokens_per_window
    base = build_method("wanda").prune(w, stats, Unstructured(0.5))
    res = build_method("dsnot", {"mode": "reference"}).prune(w, stats, Unstructured(0.5))
    assert not torch.equal(base.mask, res.mask)
    e_before = ((w - base.weight) @ mu).abs()
    e_after = ((w - res.weight) @ mu).abs()
    assert e_after.mean() < e_before.mean()


def test_stops_at_threshold():
    w, x, stats = layer()
    # a threshold above every row's initial error: no swap at all
    mu = stats.mean * stats.tokens_per_window
    base = build_method("wanda").prune(w, stats, Unstructured(0.5))
    big = float(((w - base.weight) @ mu).abs().max()) + 1
    res = build_method("dsnot", {"mode": "reference", "update_threshold": big}).prune(w, stats, Unstructured(0.5))
    assert torch.equal(res.mask, base.mask)
    # zero cycles: the base result unchanged
    res = build_method("dsnot", {"max_cycles": 0}).prune(w, stats, Unstructured(0.5))
    assert torch.equal(res.mask, base.mask)


def test_skip_leaves_layers_to_base():
    method = build_method("dsnot", {"skip": r"^mlp\."})
    assert method.for_layer("mlp.up_proj").name == "wanda"
    assert method.for_layer("self_attn.q_proj") is method


def test_sparsegpt_base_keeps_updated_weights():
    w, x, stats = layer()
    base = build_method("sparsegpt").prune(w, stats, Unstructured(0.5))
    res = build_method("dsnot", {"base": "sparsegpt", "max_cycles": 5}).prune(w, stats, Unstructured(0.5))
    untouched = base.mask & res.mask
    assert torch.equal(res.weight[untouched], base.weight[untouched])
    assert not torch.equal(res.weight[base.mask], w[base.mask])  # updated, not the dense values


@pytest.mark.parametrize("options", [{"base": "foo"}, {"mode": "fast"}, {"max_cycles": -1}, {"sign_check": "maybe"}, {"skip": "("}])
def test_bad_options(options):
    from prune_cli.errors import RecipeError

    with pytest.raises(RecipeError):
        build_method("dsnot", options)
