import pytest
import torch

from prune_cli.calibrators.stats import InputStats, Stat


def test_sums_match_definitions():
    x = torch.randn(3, 10, 6)
    s = InputStats(6, frozenset({Stat.SQ_NORM, Stat.MEAN_VAR, Stat.GRAM}))
    s.update(x)
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(s.norm, flat.norm(dim=0))
    torch.testing.assert_close(s.mean, flat.mean(0))
    torch.testing.assert_close(s.var, flat.var(0, unbiased=False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.hessian, 2 * flat.T @ flat / 30)
    assert s.count == 30


def test_merge_equals_single_pass():
    x = torch.randn(50, 4)
    wanted = frozenset({Stat.SQ_NORM, Stat.MEAN_VAR, Stat.GRAM})
    whole = InputStats(4, wanted)
    whole.update(x)
    a, b = InputStats(4, wanted), InputStats(4, wanted)
    a.update(x[:20])
    b.update(x[20:])
    merged = a.merge(b)
    assert merged.count == 50
    torch.testing.assert_close(merged.sum_sq, whole.sum_sq)
    torch.testing.assert_close(merged.xtx, whole.xtx)
    assert a.count == 20  # merge makes a new object


def test_only_wanted_stats_collected():
    s = InputStats(4, frozenset({Stat.SQ_NORM}))
    s.update(torch.randn(5, 4))
    assert s.sum is None and s.xtx is None and s.sum_sq is not None


def test_bf16_input_accumulates_in_fp32():
    s = InputStats(4, frozenset({Stat.SQ_NORM}))
    s.update(torch.ones(1000, 4, dtype=torch.bfloat16))
    assert s.sum_sq.dtype == torch.float32
    assert s.sum_sq[0].item() == 1000.0


def test_gram_sample_uses_every_stride_th_token_and_full_gram_wins():
    from prune_cli.calibrators.stats import GRAM_SAMPLE_STRIDE

    x = torch.randn(3, 10, 5, generator=torch.Generator().manual_seed(0))
    sampled = InputStats(5, frozenset({Stat.GRAM_SAMPLE}))
    for part in x:  # batch by batch, as the calibrator does
        sampled.update(part)
    rows = torch.cat([part[::GRAM_SAMPLE_STRIDE] for part in x])
    torch.testing.assert_close(sampled.xtx, rows.T @ rows)
    assert sampled.xtx_tokens == rows.shape[0] == 3 * len(range(0, 10, GRAM_SAMPLE_STRIDE)) and sampled.count == 30
    with pytest.raises(RuntimeError, match="full Gram"):
        sampled.hessian
    both = InputStats(5, frozenset({Stat.GRAM_SAMPLE, Stat.GRAM}))
    both.update(x.reshape(-1, 5))
    flat = x.reshape(-1, 5)
    torch.testing.assert_close(both.xtx, flat.T @ flat)
    assert both.xtx_tokens == 30


@pytest.mark.parametrize("d", [1, 5, 64, 97])
@pytest.mark.parametrize("blocks", [1, 3, 4, 200])
def test_symmetric_gram_is_x_t_x_and_exactly_symmetric(d, blocks):
    from prune_cli.calibrators.stats import symmetric_gram

    x = torch.randn(300, d, generator=torch.Generator().manual_seed(d)) * torch.linspace(0.1, 10, d)
    g = symmetric_gram(x, blocks)
    assert g.shape == (d, d) and torch.equal(g, g.T)
    exact = x.double().T @ x.double()
    assert (g.double() - exact).abs().max() <= 1e-6 * exact.abs().max()  # fp32 rounding only
