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
