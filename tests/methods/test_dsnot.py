import pytest
import torch

from prune_cli.core.patterns import NM, Unstructured
from prune_cli.methods import build_method
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
    from prune_cli.core.errors import RecipeError

    with pytest.raises(RecipeError):
        build_method("dsnot", options)


@pytest.mark.parametrize("pattern", [Unstructured(0.6), NM(2, 4)])
@pytest.mark.parametrize("mode", ["guarded", "reference"])
@pytest.mark.parametrize("base", ["wanda", "sparsegpt"])
def test_group_equals_one_loop_per_linear(pattern, mode, base):
    """prune_group stacks Linears of the same width into one swap loop (two of them reading the
    same input, like q/k, one with its own input, one of another width): rows never interact,
    so every weight and mask must equal the per-Linear result exactly."""
    w1, x, shared = layer(seed=0, out_f=48, in_f=64)
    w2 = torch.randn(24, 64, generator=torch.Generator().manual_seed(7))
    w3, _, own = layer(seed=3, out_f=40, in_f=64)
    w4, _, wide = layer(seed=4, out_f=16, in_f=96)
    jobs = [(w1, shared, pattern), (w4, wide, pattern), (w2, shared, pattern), (w3, own, pattern)]
    method = build_method("dsnot", {"base": base, "mode": mode})
    grouped = method.prune_group(jobs)
    for (w, stats, p), res in zip(jobs, grouped):
        alone = method.prune(w, stats, p)
        assert torch.equal(res.mask, alone.mask)
        assert torch.equal(res.weight, alone.weight)
    assert any(not torch.equal(r.mask, build_method(base).prune(w, s, p).mask) for (w, s, p), r in zip(jobs, grouped))


def test_guard_gram_default_is_sampled_full_on_request_and_free_with_sparsegpt():
    from prune_cli.calibrators.stats import Stat

    assert Stat.GRAM_SAMPLE in build_method("dsnot").required_stats
    assert Stat.GRAM not in build_method("dsnot").required_stats
    assert Stat.GRAM in build_method("dsnot", {"guard_gram": "full"}).required_stats
    sgpt = build_method("dsnot", {"base": "sparsegpt"}).required_stats
    assert Stat.GRAM in sgpt and Stat.GRAM_SAMPLE not in sgpt
    assert not ({Stat.GRAM, Stat.GRAM_SAMPLE} & build_method("dsnot", {"mode": "reference"}).required_stats)


@pytest.mark.parametrize("pattern", [Unstructured(0.6), NM(2, 4)])
def test_guarded_with_sampled_gram_never_increases_error_on_the_sample(pattern):
    from prune_cli.calibrators.stats import GRAM_SAMPLE_STRIDE, InputStats, Stat

    w, x, _ = layer(seed=5)
    stats = InputStats(x.shape[1], frozenset({Stat.SQ_NORM, Stat.MEAN_VAR, Stat.GRAM_SAMPLE}), tokens_per_window=8)
    stats.update(x)
    sample = x[::GRAM_SAMPLE_STRIDE]
    before = recon_error(w, build_method("wanda").prune(w, stats, pattern).weight, sample)
    res = build_method("dsnot").prune(w, stats, pattern)
    assert not torch.equal(res.mask, build_method("wanda").prune(w, stats, pattern).mask)
    assert recon_error(w, res.weight, sample) <= before * (1 + 1e-6)


def _released_dsnot_unstructured(w, mu, var, wanda, sparsity, threshold, cycles, power=1.0):
    """A slow, row-by-row rendering of the released DSnoT loop for unstructured sparsity
    (zyxxmu/DSnoT lib/prune.py, Wanda initial mask, same-sign check off as its flag leaves it):
    one regrow list (the error metric of pruned weights / var^p, kept ones at 0, ascending; read
    from the top when e > 0, else from the bottom), one prune list (kept weights by ascending
    Wanda score: negative-effect ones first in that order, positive-effect ones after, reversed;
    read from the end when e < 0, else from the start); a row stops at its first refused swap.
    Returns the KEEP mask."""
    out_f, in_f = w.shape
    k = int(in_f * sparsity)
    keep = torch.ones_like(w, dtype=torch.bool)
    for r in range(out_f):
        order = torch.sort(wanda[r], stable=True).indices
        pruned, kept = order[:k], order[k:]
        keep[r, pruned] = False
        metric = w[r] * mu
        regrow = metric.clone()
        regrow[kept] = 0
        e = regrow.sum()
        regrow = regrow / var.pow(power)
        regrow_order = torch.sort(regrow, stable=True).indices.tolist()
        masked = wanda[r].clone()
        masked[pruned] = float("inf")
        kept_sorted = torch.sort(masked, stable=True).indices[: in_f - k]
        effect = metric[kept_sorted]
        prune_list = kept_sorted[effect < 0].tolist() + kept_sorted[effect > 0].flip(0).tolist()
        lo, hi, plo, phi = 0, len(regrow_order) - 1, 0, len(prune_list) - 1
        for _ in range(cycles):
            if e > 0:
                j, hi = regrow_order[hi], hi - 1
            else:
                j, lo = regrow_order[lo], lo + 1
            if e < 0:
                kk, phi = prune_list[phi], phi - 1
            else:
                kk, plo = prune_list[plo], plo + 1
            if not abs(e) > threshold:
                break
            e = e + metric[kk] - metric[j]
            keep[r, kk], keep[r, j] = False, True
    return keep


@pytest.mark.parametrize("sparsity", [0.5, 0.6])
def test_reference_mode_equals_the_released_loop(sparsity):
    """Where the release's lists do not run into the other sign class (wide rows, few cycles),
    reference mode must pick exactly the swaps the released loop picks."""
    w, x, stats = layer(seed=4, out_f=40, in_f=256)
    cycles = 8
    method = build_method("dsnot", {"mode": "reference", "max_cycles": cycles})
    res = method.prune(w, stats, Unstructured(sparsity))
    mu = stats.mean * stats.tokens_per_window
    expected = _released_dsnot_unstructured(
        w, mu, stats.var.clamp_min(1e-12), w.abs() * stats.norm, sparsity, method.update_threshold, cycles
    )
    assert torch.equal(res.mask, expected)
    assert (res.mask != build_method("wanda").prune(w, stats, Unstructured(sparsity)).mask).any(dim=1).sum() >= 10


@pytest.mark.parametrize("pattern", [Unstructured(0.6), Unstructured(0.95), Unstructured(0.1), NM(2, 4)])
@pytest.mark.parametrize("mode", ["guarded", "reference"])
@pytest.mark.parametrize("base", ["wanda", "sparsegpt"])
def test_one_list_per_sign_equals_both_lists(monkeypatch, pattern, mode, base):
    """With the sign check on, each row builds only the candidate lists of its own sign of ``e``
    and unstructured rows walk them column by column (``_swap_in_list_order``); the result must
    equal that of the general loop over both lists with per-row pointers."""
    from prune_cli.methods import dsnot

    w, x, stats = layer(seed=6)
    method = build_method("dsnot", {"mode": mode, "sign_check": "on", "base": base})
    fast = method.prune(w, stats, pattern)
    init = dsnot._SwapState.__init__

    def both_lists(self, method, rows, check_sign):
        init(self, method, rows, check_sign)
        if self.sign_fixed:  # rebuild the two lists and let every row read its own
            ranked = rows.ranked(method.var_power)
            self.grow_hi, self.n_grow = dsnot._ordered(ranked, ~rows.keep, True, method.max_cycles)
            self.grow_lo, _ = dsnot._ordered(ranked, ~rows.keep, False, method.max_cycles)
            self.sign_fixed = False

    monkeypatch.setattr(dsnot._SwapState, "__init__", both_lists)
    monkeypatch.setattr(dsnot.DSnoT, "_walks_lists_in_order", staticmethod(lambda m, check_sign, kernel: False))
    slow = method.prune(w, stats, pattern)
    assert torch.equal(fast.mask, slow.mask) and torch.equal(fast.weight, slow.weight)
    if base == "wanda" or pattern == Unstructured(0.6):  # swaps happened (SparseGPT at 10% needs none)
        assert not torch.equal(fast.mask, build_method(base).prune(w, stats, pattern).mask)
